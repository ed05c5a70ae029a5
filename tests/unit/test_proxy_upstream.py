"""agent.proxy.upstream: which source address the inbound leg may use (pure), and the transparent socket."""

from __future__ import annotations

import pytest

from agent.identity.spiffe import SpiffeId
from agent.proxy.upstream import SourceRefused, source_for
from agent.registry.model import Workload

TD = "unit.tcpmesh"
SHOP = SpiffeId(TD, "lab", "shop")


def workload(name: str, account: str, ip: str) -> Workload:
    return Workload(name, "lab", account, ip, "node1", trust_domain=TD)


def test_the_proven_identitys_own_workload_lends_its_address():
    assert source_for("10.77.1.11", workload("a", "shop", "10.77.1.11"), SHOP, "10.77.2.11") == "10.77.1.11"


@pytest.mark.parametrize("claimed", [workload("b", "other", "10.77.1.12"), None])
def test_any_other_claim_is_refused_naming_both_identities(claimed):
    with pytest.raises(SourceRefused) as exc:
        source_for("10.77.1.12", claimed, SHOP, "10.77.2.11")
    assert SHOP.uri in str(exc.value) and "10.77.1.12" in str(exc.value)
    assert (claimed.spiffe_id.uri if claimed else "to no workload") in str(exc.value)


def test_an_empty_claim_is_refused():
    with pytest.raises(SourceRefused, match=r"source address \(none\)"):
        source_for("", None, SHOP, "10.77.2.11")


def test_a_pod_reaching_itself_or_another_family_uses_the_node_address():
    me = workload("a", "shop", "10.77.1.11")
    assert source_for(me.ip, me, SHOP, "10.77.1.11") is None
    assert source_for(me.ip, me, SHOP, "fd00:77::11") is None
