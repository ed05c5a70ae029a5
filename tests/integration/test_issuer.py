"""The issuer over real TLS on loopback: placement, node credentials, one-time bootstrap tokens, limits.

Two replicas of the issuer (one process, two listeners, sharing only the CA directory, the token key,
the spent-token ledger and the registry file — as the systemd and Kubernetes forms do) answer an agent's
client (``agent.issuer.client``, stdlib ssl). Seen failing with ``placement.authorize`` made to allow
everything (node1 got node2's identity) and with ``SpentLedger.claim`` always true (a token joined twice).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import init_ca
from agent.identity.issue import make_csr
from agent.identity.issuer_ca import issue_issuer_files, issue_node_credential
from agent.issuer.client import Credential, IssuerClient, IssuerUnavailable
from agent.issuer.config import issuer_config_from_mapping
from agent.issuer.tokens import create_token_key, load_token_key, make_token

from tests.integration.issuer_world import Replica

TD = "issuer.test"
REGISTRY = f"""
trust_domain: {TD}
nodes:
  - {{name: node1, address: 10.0.0.1}}
  - {{name: node2, address: 10.0.0.2}}
workloads:
  - {{name: a-1, namespace: shop, service_account: a, ip: 10.1.0.1, node: node1}}
  - {{name: b-1, namespace: shop, service_account: b, ip: 10.2.0.1, node: node2}}
"""
A = f"spiffe://{TD}/ns/shop/sa/a"
B = f"spiffe://{TD}/ns/shop/sa/b"


@pytest.fixture
def world(tmp_path: Path):
    init_ca(TD, tmp_path / "root")
    issue_issuer_files(tmp_path / "root", tmp_path / "issuer")
    (tmp_path / "workloads.yaml").write_text(REGISTRY)
    create_token_key(tmp_path / "token.key")
    config = issuer_config_from_mapping({
        "trust_domain": TD, "ca_dir": str(tmp_path / "issuer"),
        "registry": {"file": str(tmp_path / "workloads.yaml")},
        "tokens": {"key_file": str(tmp_path / "token.key"), "spent_dir": str(tmp_path / "spent")},
        "rate": {"per_second": 1, "burst": 20}, "metrics": {"port": 0}})
    replicas = [Replica(config, "issuer-0"), Replica(config, "issuer-1")]
    bundle = (tmp_path / "issuer" / "bundle.pem").read_text()
    try:
        yield tmp_path, replicas, bundle
    finally:
        for replica in replicas:
            replica.stop()


def client(replica: Replica, bundle: str) -> IssuerClient:
    return IssuerClient([replica.address], bundle, TD, timeout=10)


def node_credential(tmp_path: Path, node: str) -> Credential:
    out = tmp_path / f"cred-{node}"
    issue_node_credential(tmp_path / "root", node, out)
    return Credential((out / "credential.crt").read_text(), (out / "credential.key").read_text())


def new_csr() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, make_csr(key)


def sign(c: IssuerClient, credential: Credential | None, *uris: str) -> dict:
    return c.call({"v": 1, "op": "sign", "ttl_seconds": 600,
                   "csrs": [{"spiffe_id": u, "csr": new_csr()[1]} for u in uris]}, credential)


def uri_of(cert_pem: str) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)[0]


def test_a_node_gets_the_identities_it_hosts_and_is_refused_those_it_does_not(world):
    tmp_path, (r0, _), bundle = world
    cred1 = node_credential(tmp_path, "node1")
    answer = sign(client(r0, bundle), cred1, A, B)
    assert answer["ok"], answer
    assert [uri_of(s["cert_pem"]) for s in answer["svids"]] == [A]
    assert answer["refused"][B]["reason"] == "not_on_node"
    assert r0.refusals("not_on_node") == 1
    # the SVID chains to the root through the issuer's intermediate and carries the CSR's key
    cert = x509.load_pem_x509_certificate(answer["svids"][0]["cert_pem"].encode())
    issuer_cert = x509.load_pem_x509_certificate(answer["svids"][0]["chain_pem"][0].encode())
    cert.verify_directly_issued_by(issuer_cert)


def test_node1s_credential_used_from_anywhere_cannot_get_node2s_identities_or_node_svid(world):
    tmp_path, (r0, r1), bundle = world
    cred1 = node_credential(tmp_path, "node1")   # copied off node1: the issuer only sees the credential
    for replica in (r0, r1):
        answer = sign(client(replica, bundle), cred1, B)
        assert answer["ok"] and not answer["svids"] and answer["refused"][B]["reason"] == "not_on_node"
        renewal = client(replica, bundle).call({"v": 1, "op": "node", "node": "node2", "csr": new_csr()[1]}, cred1)
        assert not renewal["ok"] and renewal["error"]["reason"] == "wrong_node"


def test_sign_needs_a_node_credential_and_a_workload_svid_is_not_one(world):
    tmp_path, (r0, _), bundle = world
    answer = sign(client(r0, bundle), None, A)
    assert not answer["ok"] and answer["error"]["reason"] == "no_node_credential"
    # a workload SVID of node1 (verified by the same bundle) used as the client certificate
    key_pem, csr = new_csr()
    got = client(r0, bundle).call({"v": 1, "op": "sign", "ttl_seconds": 600, "csrs": [{"spiffe_id": A, "csr": csr}]},
                                  node_credential(tmp_path, "node1"))["svids"][0]
    workload = Credential(got["cert_pem"] + "".join(got["chain_pem"]), key_pem)
    answer = sign(client(r0, bundle), workload, A)
    assert not answer["ok"] and answer["error"]["reason"] == "no_node_credential"


def test_a_bootstrap_token_joins_once_across_replicas_then_the_node_svid_renews_and_signs(world):
    tmp_path, (r0, r1), bundle = world
    token = make_token(load_token_key(tmp_path / "token.key"), "node1", time.time(), 300)
    key_pem, csr = new_csr()
    joined = client(r0, bundle).call({"v": 1, "op": "node", "node": "node1", "csr": csr, "token": token}, None)
    assert joined["ok"], joined
    assert uri_of(joined["svid"]["cert_pem"]) == f"spiffe://{TD}/node/node1"
    # the same token again, at the other replica (and at the same one): spent
    for replica in (r1, r0):
        again = client(replica, bundle).call({"v": 1, "op": "node", "node": "node1", "csr": new_csr()[1],
                                             "token": token}, None)
        assert not again["ok"] and again["error"]["reason"] == "replayed_token", again
    assert r1.refusals("replayed_token") == 1
    # the node SVID is a node credential: it renews itself (on the other replica) and gets node1's identities
    node_svid = Credential(joined["svid"]["cert_pem"] + "".join(joined["svid"]["chain_pem"]), key_pem)
    renewed = client(r1, bundle).call({"v": 1, "op": "node", "node": "node1", "csr": new_csr()[1]}, node_svid)
    assert renewed["ok"], renewed
    answer = sign(client(r1, bundle), node_svid, A, B)
    assert [uri_of(s["cert_pem"]) for s in answer["svids"]] == [A] and answer["refused"][B]["reason"] == "not_on_node"


@pytest.mark.parametrize("mangle,reason", [
    (lambda t, k: t[:-4] + ("0000" if not t.endswith("0000") else "1111"), "bad_token"),
    (lambda t, k: "tmbt1.node1.123.zz", "bad_token"),
    (lambda t, k: make_token(k, "node2", time.time(), 300), "wrong_node"),
    (lambda t, k: make_token(k, "node1", time.time() - 400, 300), "expired_token"),
    (lambda t, k: make_token(b"x" * 32, "node1", time.time(), 300), "bad_token"),
])
def test_bad_expired_and_foreign_tokens_are_refused_and_do_not_spend_anything(world, mangle, reason):
    tmp_path, (r0, _), bundle = world
    key = load_token_key(tmp_path / "token.key")
    token = make_token(key, "node1", time.time(), 300)
    answer = client(r0, bundle).call({"v": 1, "op": "node", "node": "node1", "csr": new_csr()[1],
                                      "token": mangle(token, key)}, None)
    assert not answer["ok"] and answer["error"]["reason"] == reason, answer
    assert r0.refusals(reason) == 1
    # the genuine token was not spent by the refused attempt
    assert client(r0, bundle).call({"v": 1, "op": "node", "node": "node1", "csr": new_csr()[1], "token": token},
                                   None)["ok"]


def test_a_node_asking_too_often_is_rate_limited(world):
    tmp_path, (r0, _), bundle = world
    cred1 = node_credential(tmp_path, "node1")
    c = client(r0, bundle)
    answers = [sign(c, cred1, *([A] * 8)) for _ in range(4)]   # burst 20: the third request of 8 does not fit
    assert [a["ok"] for a in answers[:2]] == [True, True]
    assert not answers[2]["ok"] and answers[2]["error"]["reason"] == "rate_limited"
    assert r0.refusals("rate_limited") >= 1


def test_bad_requests_are_refused_by_reason_and_the_connection_survives(world):
    tmp_path, (r0, _), bundle = world
    c = client(r0, bundle)
    assert c.call({"v": 2, "op": "hello"}, None)["error"]["reason"] == "unsupported_version"
    assert c.call({"v": 1, "op": "mint-anything"}, None)["error"]["reason"] == "bad_request"
    hello = c.call({"v": 1, "op": "hello"}, None)
    assert hello["ok"] and hello["trust_domain"] == TD and "BEGIN CERTIFICATE" in hello["bundle_pem"]
    bad_csr = sign(c, node_credential(tmp_path, "node1"), A)  # a good one first, then a garbage CSR
    assert bad_csr["ok"]
    answer = c.call({"v": 1, "op": "sign", "ttl_seconds": 600, "csrs": [{"spiffe_id": A, "csr": "garbage"}]},
                    node_credential(tmp_path, "node1"))
    assert answer["refused"][A]["reason"] == "bad_csr"


def test_the_client_refuses_a_server_that_is_not_the_issuer_and_tries_the_next_address(world):
    tmp_path, (r0, r1), bundle = world
    dead = IssuerClient(["127.0.0.1:1", r1.address], bundle, TD, timeout=5)
    assert dead.call({"v": 1, "op": "hello"}, None)["issuer"] == "issuer-1"
    with pytest.raises(IssuerUnavailable, match="127.0.0.1:1"):
        IssuerClient(["127.0.0.1:1"], bundle, TD, timeout=5).call({"v": 1, "op": "hello"}, None)
    # a server of the same trust domain presenting another name (here: an issuer of "other.test" expected)
    with pytest.raises(IssuerUnavailable, match="not the issuer"):
        IssuerClient([r0.address], bundle, "other.test", timeout=5).call({"v": 1, "op": "hello"}, None)
