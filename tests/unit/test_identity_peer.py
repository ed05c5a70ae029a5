"""Secure naming on verified certificates' SANs: exactly one spiffe:// URI, and the expected one."""

from __future__ import annotations

import pytest

from agent.identity.errors import PeerIdentityError
from agent.identity.peer import check_expected, spiffe_id_from_sans
from agent.identity.spiffe import SpiffeId

A = SpiffeId.parse("spiffe://td/ns/a/sa/b")
DB = SpiffeId.parse("spiffe://td/ns/db/sa/postgres")


def test_one_spiffe_uri() -> None:
    assert spiffe_id_from_sans([("URI", A.uri)]) == A


def test_other_name_types_are_ignored() -> None:
    assert spiffe_id_from_sans([("DNS", "a.example"), ("URI", A.uri), ("IP Address", "10.0.0.1")]) == A


@pytest.mark.parametrize("sans,problem", [
    ([], "no URI SAN"),
    ([("DNS", "postgres.db.svc")], "no URI SAN"),
    ([("URI", A.uri), ("URI", DB.uri)], "2 URI SANs .*spiffe://td/ns/a/sa/b, spiffe://td/ns/db/sa/postgres"),
    ([("URI", "https://td/ns/a/sa/b")], "'https://td/ns/a/sa/b', which is not a spiffe:// ID"),
    ([("URI", "spiffe://td/workload/x")], "'spiffe://td/workload/x', which is not a tcpmesh SPIFFE ID"),
])
def test_rejections_name_what_the_peer_presented(sans, problem: str) -> None:
    with pytest.raises(PeerIdentityError, match=problem):
        spiffe_id_from_sans(sans)


def test_check_expected() -> None:
    assert check_expected(DB, DB) == DB
    with pytest.raises(PeerIdentityError) as err:
        check_expected(A, DB)
    assert str(err.value) == "peer presented spiffe://td/ns/a/sa/b, expected spiffe://td/ns/db/sa/postgres"
