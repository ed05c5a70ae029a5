"""SPIFFE IDs: parsing table, round trip, and the SNI names built from them."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import assume, given, strategies as st

from agent.identity.spiffe import MAX_SNI_LENGTH, SpiffeId, SpiffeIdError

VALID = [
    ("spiffe://cluster.local/ns/default/sa/default", ("cluster.local", "default", "default")),
    ("spiffe://td/ns/db/sa/postgres", ("td", "db", "postgres")),
    ("spiffe://example.org/ns/a-1/sa/svc.v2", ("example.org", "a-1", "svc.v2")),
    ("spiffe://my_domain/ns/x/sa/y", ("my_domain", "x", "y")),
]

INVALID = [
    ("", "must start with"),
    ("http://cluster.local/ns/a/sa/b", "must start with"),
    ("spiffe://", "expected the path"),
    ("spiffe:///ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local", "expected the path"),
    ("spiffe://cluster.local/", "expected the path"),
    ("spiffe://cluster.local/ns/a", "expected the path"),
    ("spiffe://cluster.local/ns/a/sa/b/c", "expected the path"),
    ("spiffe://cluster.local/sa/b/ns/a", "expected the path"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "no query or fragment"),
    ("spiffe://cluster.local/ns/a/sa/b#f", "no query or fragment"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
    ("spiffe://.cluster/ns/a/sa/b", "trust domain"),
    ("spiffe://a..b/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster./ns/a/sa/b", "trust domain"),
    ("spiffe://" + "x" * 64 + "/ns/a/sa/b", "trust domain"),
    ("spiffe://user@cluster/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster:8443/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/-a/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a.b/sa/c", "namespace"),
    ("spiffe://cluster.local/ns//sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a/sa/B", "service account"),
    ("spiffe://cluster.local/ns/a/sa/b_c", "service account"),
    ("spiffe://cluster.local/ns/a/sa/a..b", "service account"),
    ("spiffe://cluster.local/ns/a/sa/" + "x" * 64, "service account"),
    ("spiffe://cluster.local/ns/a/sa/", "service account"),
    ("spiffe://" + "a" * 3000, "limit is"),
]


@pytest.mark.parametrize("text,parts", VALID)
def test_parse_valid(text: str, parts: tuple[str, str, str]) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert (spiffe_id.trust_domain, spiffe_id.namespace, spiffe_id.service_account) == parts
    assert spiffe_id.uri == text == str(spiffe_id)


@pytest.mark.parametrize("text,problem", INVALID)
def test_parse_invalid_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(SpiffeIdError, match=problem):
        SpiffeId.parse(text)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(SpiffeIdError, match="must be a string, got bytes"):
        SpiffeId.parse(b"spiffe://td/ns/a/sa/b")  # type: ignore[arg-type]


def test_sni_form() -> None:
    assert SpiffeId.parse("spiffe://td/ns/db/sa/postgres").sni == "postgres.db.id.td"


def test_identity_whose_sni_is_too_long_is_refused() -> None:
    long_sa = ".".join(["s" * 63] * 3)  # 191 characters: a valid DNS subdomain
    with pytest.raises(SpiffeIdError, match=f"the limit is {MAX_SNI_LENGTH}"):
        SpiffeId("d" * 40 + ".example", "n" * 20, long_sa)


_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
_trust_domains = st.lists(st.from_regex(r"[a-z0-9_-]{1,63}", fullmatch=True), min_size=1, max_size=3).map(".".join)
_service_accounts = st.lists(_label, min_size=1, max_size=3).map(".".join)


@st.composite
def spiffe_ids(draw: st.DrawFn, trust_domain: st.SearchStrategy[str] = _trust_domains) -> SpiffeId:
    td, ns, sa = draw(trust_domain), draw(_label), draw(_service_accounts)
    assume(len(f"{sa}.{ns}.id.{td}") <= MAX_SNI_LENGTH)
    return SpiffeId(td, ns, sa)


@given(spiffe_ids())
def test_round_trip(spiffe_id: SpiffeId) -> None:
    assert SpiffeId.parse(spiffe_id.uri) == spiffe_id


@given(spiffe_ids())
def test_sni_is_a_name_tls_clients_accept(spiffe_id: SpiffeId) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=spiffe_id.sni)


@given(spiffe_ids(trust_domain=st.just("cluster.local")), spiffe_ids(trust_domain=st.just("cluster.local")))
def test_sni_is_unambiguous_within_a_trust_domain(a: SpiffeId, b: SpiffeId) -> None:
    assert (a.sni == b.sni) == (a == b)


def test_sni_is_ambiguous_across_trust_domains() -> None:
    # Why SniServerContexts holds identities of one trust domain only.
    assert SpiffeId("id.x", "b", "a").sni == SpiffeId("x", "id", "a.b").sni
