"""Trust bundles with several roots, chains through node intermediates in real TLS 1.3 handshakes,
and the words a rejected handshake is reported in (expired, not yet valid, other trust domain,
unknown CA) — on the dialing side and the accepting side."""

from __future__ import annotations

import ssl
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint, make_bundle, parse_bundle
from agent.identity.ca import generate_ca
from agent.identity.errors import CaError, PeerIdentityError
from agent.identity.node_ca import issue_node_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from agent.identity.issue import issue_svid
from agent.identity.svid import Svid
from agent.identity.tls import SniServerContexts, client_context, describe_tls_error, server_context
from tests.unit.test_identity_tls import handshake

TD = "td"
CLIENT = SpiffeId.parse("spiffe://td/ns/a/sa/b")
DB = SpiffeId.parse("spiffe://td/ns/db/sa/postgres")


@pytest.fixture(scope="module")
def old_root():
    return generate_ca(TD)


@pytest.fixture(scope="module")
def new_root():
    return generate_ca(TD)


def test_bundle_parses_several_roots_and_drops_duplicates(old_root, new_root) -> None:
    bundle = parse_bundle(old_root.cert_pem + new_root.cert_pem + old_root.cert_pem, "b.pem")
    assert bundle.fingerprints == (fingerprint(old_root.certificate), fingerprint(new_root.certificate))
    assert bundle.trust_domain == TD and old_root.certificate in bundle
    assert bundle.with_root(new_root.certificate) is bundle
    assert old_root.cert_pem in bundle.pem and new_root.cert_pem in bundle.pem
    assert old_root.cert_pem[:100] not in repr(bundle)
    # the two roots of one trust domain have distinct names (key-id suffix)
    assert old_root.certificate.subject != new_root.certificate.subject


def test_bundle_refuses_intermediates_mixed_domains_and_nothing(old_root) -> None:
    node = issue_node_ca(old_root, "node1")
    with pytest.raises(CaError, match="not a self-signed root"):
        make_bundle([old_root.certificate, node.certificate], "b.pem")
    with pytest.raises(CaError, match="mixes trust domains"):
        make_bundle([old_root.certificate, generate_ca("other").certificate], "b.pem")
    with pytest.raises(CaError, match="holds no certificate"):
        parse_bundle(b"", "b.pem")


@pytest.mark.parametrize("client_root, server_root", [("old", "old"), ("old", "new"), ("new", "old"), ("new", "new")])
def test_two_root_bundle_accepts_chains_to_either_root(old_root, new_root, client_root, server_root) -> None:
    """The overlap of a root rotation: a node on the new root and a node on the old one still talk."""
    roots = {"old": old_root, "new": new_root}
    bundle = old_root.cert_pem + new_root.cert_pem
    client = issue_svid(issue_node_ca(roots[client_root], "node1"), CLIENT, 3600)
    server = issue_svid(issue_node_ca(roots[server_root], "node2"), DB, 3600)
    front = SniServerContexts(bundle, {DB: server_context(server, bundle)})
    result = handshake(client_context(client, bundle), front.context, DB.sni)
    assert result.established, result.errors


def test_a_bundle_without_the_peers_root_rejects_it_as_unknown_ca(old_root, new_root) -> None:
    client = issue_svid(issue_node_ca(new_root, "node1"), CLIENT, 3600)
    server = issue_svid(issue_node_ca(old_root, "node2"), DB, 3600)
    front = SniServerContexts(old_root.cert_pem, {DB: server_context(server, old_root.cert_pem)})
    result = handshake(client_context(client, new_root.cert_pem), front.context, DB.sni)
    assert "unknown CA" in describe_tls_error(result.errors["server"])
    assert "unknown CA" in describe_tls_error(result.errors["client"])


def _forged_leaf(ca, uri: str) -> Svid:
    """A leaf for ``uri`` signed by ``ca`` without issue_svid's trust-domain check (a misbehaving node)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = ca.sign(x509.CertificateBuilder().subject_name(x509.Name([])).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                  critical=True)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True))
    return Svid(SpiffeId.parse(uri), cert.public_bytes(serialization.Encoding.PEM).decode(),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode(),
                ca.leaf_chain_pem, cert.serial_number, now - timedelta(minutes=1), now + timedelta(hours=1), now)


def _bad_svids(root):
    node = issue_node_ca(root, "node3")
    now = datetime.now(timezone.utc)
    return {
        "expired": (issue_svid(node, CLIENT, 60, now=now - timedelta(hours=2)), "peer certificate has expired"),
        "not yet valid": (issue_svid(node, CLIENT, 600, now=now + timedelta(hours=1)),
                          "peer certificate is not yet valid"),
        "other trust domain": (_forged_leaf(node, "spiffe://evil.example/ns/a/sa/b"),
                               "outside this trust domain"),
        "unknown CA": (issue_svid(issue_node_ca(generate_ca(TD), "node3"), CLIENT, 600), "unknown CA"),
    }


@pytest.mark.parametrize("case", ["expired", "not yet valid", "other trust domain", "unknown CA"])
def test_rejections_name_the_reason_on_both_sides(old_root, case) -> None:
    bad, words = _bad_svids(old_root)[case]
    good = issue_svid(issue_node_ca(old_root, "node2"), DB, 3600)
    bundle = old_root.cert_pem
    # accepting side: a client presents the bad certificate
    front = SniServerContexts(bundle, {DB: server_context(good, bundle)})
    result = handshake(client_context(bad, bundle), front.context, DB.sni)
    assert isinstance(result.errors.get("server"), ssl.SSLCertVerificationError), result.errors
    assert words in describe_tls_error(result.errors["server"])
    # dialing side: a server presents it
    bad_front = SniServerContexts(bundle, {bad.spiffe_id: server_context(bad, bundle)}) \
        if bad.spiffe_id.trust_domain == TD else None
    server_ctx = bad_front.context if bad_front else server_context(bad, bundle)
    result = handshake(client_context(good, bundle), server_ctx, bad.spiffe_id.sni if bad_front else None)
    assert words in describe_tls_error(result.errors["client"]), result.errors
    assert "PRIVATE" not in describe_tls_error(result.errors["client"])


def test_alerts_say_what_the_peer_refused(old_root) -> None:
    expired = issue_svid(issue_node_ca(old_root, "node3"), CLIENT, 60,
                         now=datetime.now(timezone.utc) - timedelta(hours=2))
    good = issue_svid(old_root, DB, 3600)
    front = SniServerContexts(old_root.cert_pem, {DB: server_context(good, old_root.cert_pem)})
    result = handshake(client_context(expired, old_root.cert_pem), front.context, DB.sni)
    assert describe_tls_error(result.errors["client"]).startswith("the peer rejected this node's certificate as expired")


def test_store_refuses_a_peer_of_another_trust_domain(old_root) -> None:
    """Second guard behind the name constraints: a verified peer must still be of our trust domain."""
    other = generate_ca("other")
    bundle = old_root.cert_pem + other.cert_pem  # as if a foreign root had been put in the bundle
    store = IdentityStore(old_root, bundle, 3600)
    store.ensure([DB])
    stranger = issue_svid(other, SpiffeId.parse("spiffe://other/ns/a/sa/b"), 600)
    result = handshake(client_context(stranger, bundle), store.server_context, DB.sni)
    assert result.established
    with pytest.raises(PeerIdentityError, match="from trust domain 'other'; this node accepts trust domain 'td' only"):
        store.peer_identity(result.server)


def test_peer_not_after_tells_when_an_established_tunnel_outlives_the_peer_certificate(old_root) -> None:
    from agent.identity.tls import peer_not_after

    client = issue_svid(old_root, CLIENT, 600)
    server = issue_svid(old_root, DB, 3600)
    front = SniServerContexts(old_root.cert_pem, {DB: server_context(server, old_root.cert_pem)})
    result = handshake(client_context(client, old_root.cert_pem), front.context, DB.sni)
    assert peer_not_after(result.client) == server.not_after.timestamp()
    assert peer_not_after(result.server) == client.not_after.timestamp()


def test_peer_credential_names_the_chains_end_and_root_and_stops_holding_when_either_goes(old_root, new_root) -> None:
    from agent.identity.bundle import fingerprint
    from agent.identity.tls import peer_credential, trust_anchors

    client = issue_svid(old_root, CLIENT, 600)
    server = issue_svid(old_root, DB, 3600)
    front = SniServerContexts(old_root.cert_pem, {DB: server_context(server, old_root.cert_pem)})
    result = handshake(client_context(client, old_root.cert_pem), front.context, DB.sni)
    credential = peer_credential(result.server)
    assert credential.not_after == client.not_after.timestamp()  # the earliest notAfter of the chain
    assert credential.anchor == fingerprint(old_root.certificate)
    anchors = trust_anchors(old_root.cert_pem + new_root.cert_pem)
    assert anchors == {fingerprint(old_root.certificate), fingerprint(new_root.certificate)}
    assert credential.problem(credential.not_after - 1, anchors) is None
    assert "expired" in credential.problem(credential.not_after + 5, anchors)
    assert "no longer in this node's trust bundle" in credential.problem(0, trust_anchors(new_root.cert_pem))
