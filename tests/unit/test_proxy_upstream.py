"""agent.proxy.upstream: which source address the inbound leg may use (pure), and the transparent socket."""

from __future__ import annotations

import pytest

from agent.identity.spiffe import SpiffeId
from agent.proxy.upstream import SourceRefused, source_for
from agent.registry.model import Workload

TD = "unit.tcpmesh"
SHOP = SpiffeId(TD, "lab", "shop")


def workload(name: str, account: str, ip: str, ip6: str | None = None) -> Workload:
    return Workload(name, "lab", account, ip, "node1", trust_domain=TD, ip6=ip6)


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


def test_a_pod_reaching_itself_or_without_the_destinations_family_uses_the_node_address():
    me = workload("a", "shop", "10.77.1.11")
    assert source_for(me.ip, me, SHOP, "10.77.1.11") is None
    assert source_for(me.ip, me, SHOP, "fd00:77::11") is None  # an IPv4-only workload
    dual = workload("a", "shop", "10.77.1.11", "fd00:77:1::11")
    assert source_for(dual.ip, dual, SHOP, "fd00:77:1::11") is None


@pytest.mark.parametrize("claimed_ip", ["10.77.1.11", "fd00:77:1::11"])
def test_an_ipv6_destination_is_reached_from_the_workloads_ipv6_address(claimed_ip):
    """An IPv6 client socket reaches the outbound proxy over IPv4 (::ffff:REDIR_IP): whichever of its
    addresses the client node names, the leg to an IPv6 server borrows the workload's IPv6 address,
    and the leg to an IPv4 server its IPv4 address."""
    dual = workload("a", "shop", "10.77.1.11", "fd00:77:1::11")
    assert source_for(claimed_ip, dual, SHOP, "fd00:77:2::11") == "fd00:77:1::11"
    assert source_for(claimed_ip, dual, SHOP, "10.77.2.11") == "10.77.1.11"


def test_an_ipv6_claim_of_another_identitys_workload_is_refused():
    other = workload("b", "other", "10.77.1.12", "fd00:77:1::12")
    with pytest.raises(SourceRefused, match="fd00:77:1::12"):
        source_for("fd00:77:1::12", other, SHOP, "fd00:77:2::11")
