"""Kubernetes node attestation and placement at the issuer, over real TLS, against the API stand-in.

Two issuer replicas (``registry.source: kubernetes``, ``attestation.kubernetes.enabled``) read pods
and nodes from the list/watch stand-in (tests/integration/test_kubernetes_apiserver.py) and ask it
TokenReviews and pods as they would ask the API server. The agent DaemonSet's pods
(``tcpmesh-system/tcpmesh-agent-*``, service account ``tcpmesh-agent``, one per node) carry projected
tokens the stand-in makes as the kubelet would. Hostile first: another service account's token, a
token of node B's agent asking for node A, a token for another audience, a deleted pod's token, a
forged JWT with the right claims — all refused, logged with the reason and counted; a node
credential cannot renew itself while attestation is exclusive. Placement: a node gets SVIDs only for
service accounts with a pod on it, and loses one when its pod goes. Seen failing before the
attestation existed (every ``service_account_token`` request was ``no_node_credential``) and with
``attested_node`` returning the node asked for instead of the pod's ``spec.nodeName`` (the worker-2
token got worker-1's credential).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from cryptography import x509  # noqa: E402

from agent.identity.ca import init_ca  # noqa: E402
from agent.identity.issuer_ca import issue_issuer_files, issue_node_credential  # noqa: E402
from agent.issuer.client import Credential, IssuerClient  # noqa: E402
from agent.issuer.config import issuer_config_from_mapping  # noqa: E402

from tests.integration.issuer_world import Replica  # noqa: E402
from tests.integration.test_issuer import new_csr, uri_of  # noqa: E402
from tests.integration.test_kubernetes_apiserver import API_AUDIENCE, FakeApiServer  # noqa: E402

TD = "cluster.local"
AUDIENCE = "tcpmesh-issuer"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
CART = f"spiffe://{TD}/ns/shop/sa/cart"
POSTGRES = f"spiffe://{TD}/ns/data/sa/postgres"
WEB_UID = "5f0c6b1e-2a3d-4c5e-8f70-1a2b3c4d5e6f"
AGENT_UIDS = {"worker-1": "a9e1c0de-0001-4000-8000-000000000001", "worker-2": "a9e1c0de-0002-4000-8000-000000000002"}
NODE_IPS = {"worker-1": "10.0.0.11", "worker-2": "10.0.0.12"}


def agent_pod(node: str, service_account: str = "tcpmesh-agent") -> dict:
    """A pod of the agent DaemonSet as the API server returns it (hostNetwork: not a mesh workload)."""
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": f"tcpmesh-agent-{node[-1]}x7q2", "namespace": "tcpmesh-system",
                     "uid": AGENT_UIDS[node], "creationTimestamp": "2026-12-06T08:00:00Z",
                     "labels": {"app.kubernetes.io/name": "tcpmesh-agent"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "tcpmesh-agent",
                                          "uid": "d5d5d5d5-0000-4000-8000-000000000001", "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {"serviceAccountName": service_account, "serviceAccount": service_account, "nodeName": node,
                 "hostNetwork": True, "containers": [{"name": "agent", "image": "tcpmesh/agent:0.1.0"}]},
        "status": {"phase": "Running", "hostIP": NODE_IPS[node], "podIP": NODE_IPS[node],
                   "podIPs": [{"ip": NODE_IPS[node]}], "qosClass": "Burstable"}}


def issuer_config(tmp_path: Path, api: FakeApiServer, **attestation) -> object:
    return issuer_config_from_mapping({
        "trust_domain": TD, "ca_dir": str(tmp_path / "issuer"),
        "registry": {"source": "kubernetes", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))},
        "attestation": {"kubernetes": {"enabled": True, "audience": AUDIENCE, **attestation}},
        "rate": {"joins_per_minute": 600}, "metrics": {"port": 0}})


@pytest.fixture
def world(tmp_path: Path):
    api = FakeApiServer().start()
    for node in AGENT_UIDS:
        api.put("pods", agent_pod(node))
    init_ca(TD, tmp_path / "root")
    issue_issuer_files(tmp_path / "root", tmp_path / "issuer")
    replicas: list[Replica] = []
    try:
        config = issuer_config(tmp_path, api)
        replicas += [Replica(config, "issuer-0"), Replica(config, "issuer-1")]
        bundle = (tmp_path / "issuer" / "bundle.pem").read_text()
        yield tmp_path, api, replicas, bundle
    finally:
        for replica in replicas:
            replica.stop()
        api.stop()


def ask_node(replica: Replica, bundle: str, node: str, sa_token: str, credential: Credential | None = None) -> dict:
    client = IssuerClient([replica.address], bundle, TD, timeout=10)
    return client.call({"v": 1, "op": "node", "node": node, "csr": new_csr()[1], "service_account_token": sa_token},
                       credential)


def agent_token(api: FakeApiServer, node: str, audience: str = AUDIENCE) -> str:
    return api.issue_token("tcpmesh-system", f"tcpmesh-agent-{node[-1]}x7q2", audience)


def test_the_agent_pods_token_gets_its_nodes_credential_from_either_replica(world):
    tmp_path, api, (r0, r1), bundle = world
    token = agent_token(api, "worker-1")
    for replica in (r0, r1):   # no shared ledger: any replica attests alone
        answer = ask_node(replica, bundle, "worker-1", token)
        assert answer["ok"], answer
        assert uri_of(answer["svid"]["cert_pem"]) == f"spiffe://{TD}/node/worker-1"
    # the issuer asked the API, for its audience, and read the bound pod
    assert [r["spec"]["audiences"] for r in api.token_reviews] == [[AUDIENCE], [AUDIENCE]]
    assert ("pod", {"namespace": "tcpmesh-system", "name": "tcpmesh-agent-1x7q2"}) in api.requests


@pytest.mark.parametrize("make_token,reason,words", [
    # a pod of another service account (the web workload on the same node), right audience
    (lambda api: api.issue_token("shop", "web-7d4b9c6f5-x2x9k", AUDIENCE), "wrong_service_account",
     "system:serviceaccount:shop:web"),
    # node B's agent asking for node A
    (lambda api: agent_token(api, "worker-2"), "wrong_node", "runs on node 'worker-2'"),
    # the agent's own token, but for the API server's audience (the default service-account token)
    (lambda api: agent_token(api, "worker-1", API_AUDIENCE), "bad_sa_token", "is invalid for the target audiences"),
    # the right claims, JWT-shaped, not signed by the API server: the issuer must not read tokens itself
    (lambda api: api.sign_claims({"aud": [AUDIENCE], "exp": int(time.time()) + 600,
                                  "sub": "system:serviceaccount:tcpmesh-system:tcpmesh-agent",
                                  "kubernetes.io": {"namespace": "tcpmesh-system",
                                                    "pod": {"name": "tcpmesh-agent-1x7q2",
                                                            "uid": AGENT_UIDS["worker-1"]}}}, key=b"k" * 32),
     "bad_sa_token", "cryptographic"),
    (lambda api: "not-a-token", "bad_sa_token", "invalid bearer token"),
])
def test_hostile_tokens_are_refused_logged_and_counted(world, caplog, make_token, reason, words):
    tmp_path, api, (r0, _), bundle = world
    caplog.set_level(logging.WARNING, "tcpmesh.issuer")
    answer = ask_node(r0, bundle, "worker-1", make_token(api))
    assert not answer["ok"] and answer["error"]["reason"] == reason, answer
    assert words in answer["error"]["message"]
    assert r0.refusals(reason) == 1
    assert any(f"{reason}:" in r.getMessage() and "worker-1" in r.getMessage() for r in caplog.records)


def test_a_deleted_pods_token_is_refused(world):
    tmp_path, api, (r0, r1), bundle = world
    token = agent_token(api, "worker-1")
    assert ask_node(r0, bundle, "worker-1", token)["ok"]
    api.delete("pods", AGENT_UIDS["worker-1"])
    answer = ask_node(r1, bundle, "worker-1", token)
    assert not answer["ok"] and answer["error"]["reason"] == "bad_sa_token", answer
    assert "invalidated" in answer["error"]["message"]
    # recreated under the same name (another uid): the old pod's token still proves nothing
    api.put("pods", {**agent_pod("worker-1"), "metadata": {**agent_pod("worker-1")["metadata"], "uid": "f" * 8}})
    assert ask_node(r0, bundle, "worker-1", token)["error"]["reason"] == "bad_sa_token"


def test_an_attested_node_signs_only_its_pods_identities_and_cannot_renew_without_a_token(world):
    tmp_path, api, (r0, r1), bundle = world
    key_pem, csr = new_csr()
    client = IssuerClient([r0.address], bundle, TD, timeout=10)
    joined = client.call({"v": 1, "op": "node", "node": "worker-1", "csr": csr,
                          "service_account_token": agent_token(api, "worker-1")}, None)
    node_svid = Credential(joined["svid"]["cert_pem"] + "".join(joined["svid"]["chain_pem"]), key_pem)
    signed = client.call({"v": 1, "op": "sign", "ttl_seconds": 600,
                          "csrs": [{"spiffe_id": u, "csr": new_csr()[1]} for u in (WEB, CART, POSTGRES)]}, node_svid)
    assert sorted(uri_of(s["cert_pem"]) for s in signed["svids"]) == [CART, WEB]
    assert signed["refused"][POSTGRES]["reason"] == "not_on_node"
    # exclusive attestation: the node SVID cannot renew itself (a copied one dies at its expiry)
    renewal = client.call({"v": 1, "op": "node", "node": "worker-1", "csr": new_csr()[1]}, node_svid)
    assert not renewal["ok"] and renewal["error"]["reason"] == "attestation_required"
    assert r0.refusals("attestation_required") == 1


def test_placement_follows_the_pods_a_node_runs(world):
    """registry.source kubernetes: web leaves worker-1 → refused at its next renewal; a pod of web that is
    scheduled to worker-2 but has no IP yet (pending) does not make web worker-2's."""
    tmp_path, api, (r0, r1), bundle = world
    cred1 = tmp_path / "cred-1"
    issue_node_credential(tmp_path / "root", "worker-1", cred1)
    credential = Credential((cred1 / "credential.crt").read_text(), (cred1 / "credential.key").read_text())

    def sign(replica: Replica, node_credential: Credential, uri: str) -> dict:
        return IssuerClient([replica.address], bundle, TD, timeout=10).call(
            {"v": 1, "op": "sign", "ttl_seconds": 600, "csrs": [{"spiffe_id": uri, "csr": new_csr()[1]}]},
            node_credential)

    assert [uri_of(s["cert_pem"]) for s in sign(r1, credential, WEB)["svids"]] == [WEB]
    cred2 = tmp_path / "cred-2"
    issue_node_credential(tmp_path / "root", "worker-2", cred2)
    credential2 = Credential((cred2 / "credential.crt").read_text(), (cred2 / "credential.key").read_text())
    assert sign(r1, credential2, WEB)["refused"][WEB]["reason"] == "not_on_node"
    api.delete("pods", WEB_UID)
    deadline = time.monotonic() + 20
    while not all(WEB in sign(r, credential, WEB)["refused"] for r in (r0, r1)):   # each replica watches
        assert time.monotonic() < deadline, "the deleted pod's identity is still signed for worker-1"
        time.sleep(0.1)
    assert sign(r1, credential, WEB)["refused"][WEB]["reason"] == "not_on_node"
    assert sign(r0, credential, CART)["svids"]


def test_an_api_server_that_does_not_answer_refuses_with_a_reason(world):
    tmp_path, api, (r0, _), bundle = world
    token = agent_token(api, "worker-1")
    api.go_away()
    answer = ask_node(r0, bundle, "worker-1", token)
    assert not answer["ok"] and answer["error"]["reason"] == "attestation_unavailable", answer
    assert "TokenReview" in answer["error"]["message"]
    api.come_back()
    assert ask_node(r0, bundle, "worker-1", token)["ok"]
    # an issuer whose role lacks create on tokenreviews: refused, and the message names the RBAC to add
    api.fail("tokenreviews", 403)
    answer = ask_node(r0, bundle, "worker-1", token)
    assert answer["error"]["reason"] == "attestation_unavailable" and "HTTP 403" in answer["error"]["message"]
    assert "tokenreviews" in answer["error"]["message"] and "04-issuer.yaml" in answer["error"]["message"]
    # it names the issuer's ServiceAccount (as the API server saw it) and the exact rule, not the agent's RBAC
    assert "system:serviceaccount:tcpmesh-system:tcpmesh-issuer" in answer["error"]["message"]
    assert 'resources: ["tokenreviews"], verbs: ["create"]' in answer["error"]["message"]
    assert "ClusterRole tcpmesh-issuer" in answer["error"]["message"]
    assert r0.refusals("attestation_unavailable") == 2


def test_an_issuer_without_attestation_refuses_service_account_tokens(tmp_path):
    api = FakeApiServer().start()
    api.put("pods", agent_pod("worker-1"))
    init_ca(TD, tmp_path / "root")
    issue_issuer_files(tmp_path / "root", tmp_path / "issuer")
    config = issuer_config(tmp_path, api, enabled=False)
    replica = Replica(config, "issuer-0")
    try:
        answer = ask_node(replica, (tmp_path / "issuer" / "bundle.pem").read_text(), "worker-1",
                          agent_token(api, "worker-1"))
        assert not answer["ok"] and answer["error"]["reason"] == "attestation_off"
        assert api.token_reviews == []
    finally:
        replica.stop()
        api.stop()


def test_an_agent_configured_as_the_daemonset_joins_by_attestation_and_gets_its_nodes_identities_only(
        in_process_agent, tmp_path):
    """The agent with the ConfigMap's identity section (deploy/kubernetes/02-config.yaml) — its paths
    pointed into the test's directory, its issuer address at two replicas — and the Kubernetes registry:
    it joins by attestation with its pod's token, gets SVIDs for worker-1's pods (web, cart) and no
    other, holds no signing key, and renews its node SVID by attestation again (a node credential
    cannot renew itself here)."""
    import asyncio
    import json

    import yaml

    from tests.integration.conftest import free_ports
    from tests.unit.test_kubernetes_manifests import find

    configmap = yaml.safe_load(find("ConfigMap", "tcpmesh-config")["data"]["config.yaml"])
    identity = configmap["identity"]
    assert identity["mode"] == "issuer" and "node_ca_dir" not in identity
    api = FakeApiServer().start()
    replicas: list[Replica] = []
    try:
        for node in AGENT_UIDS:
            api.put("pods", agent_pod(node))
        ports = free_ports(2)
        token_file = tmp_path / "projected" / "token"
        token_file.parent.mkdir()
        token_file.write_text(agent_token(api, "worker-1"))
        (tmp_path / "cred").mkdir(mode=0o700)   # the DaemonSet's emptyDir
        issuer_section = {**identity["issuer"], "addresses": [f"127.0.0.1:{p}" for p in ports],
                          "service_account_token_file": str(token_file),
                          "ca_bundle": str(tmp_path / "root" / "ca.crt"), "credential_dir": str(tmp_path / "cred")}
        proc = in_process_agent(TD, "worker-1", identity={**identity, "issuer": issuer_section, "poll_seconds": 0.2},
                                registry={"source": "kubernetes",
                                          "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))})
        issue_issuer_files(tmp_path / "root", tmp_path / "issuer")   # the root the fixture made
        config = issuer_config_from_mapping({
            "trust_domain": TD, "ca_dir": str(tmp_path / "issuer"), "dev_short_ttl": True,
            "node_svid_ttl_seconds": 20,
            "registry": {"source": "kubernetes", "kubeconfig": str(tmp_path / "kubeconfig")},
            "attestation": {"kubernetes": {"enabled": True}}, "rate": {"joins_per_minute": 600},
            "metrics": {"port": 0}})
        replicas += [Replica(config, f"issuer-{i}", port) for i, port in enumerate(ports)]

        async def certs() -> dict:
            status, body = await proc.http_get("/debug/certs")
            assert status == 200, body
            return json.loads(body)

        async def main():
            async with proc.running():
                message = await proc.next_message()
                while message.startswith(b"STATUS=NOT READY"):   # waiting for its first SVIDs (not ready)
                    message = await proc.next_message()
                assert message.startswith(b"READY=1\n"), message
                deadline = time.monotonic() + 60
                report = await certs()    # READY=1 only once every local identity has its SVID
                assert sorted(i["spiffe_id"] for i in report["identities"]) == [CART, WEB], report
                assert report["issuer"]["node_credential"]["spiffe_id"] == f"spiffe://{TD}/node/worker-1"
                assert report["issuer"]["pending"] == []
                first = (tmp_path / "cred" / "credential.crt").read_text()
                reviews = len(api.token_reviews)
                token_file.write_text(agent_token(api, "worker-1"))   # the kubelet's refresh
                while (tmp_path / "cred" / "credential.crt").read_text() == first:   # renewed at half of 20 s
                    assert time.monotonic() < deadline + 30, "the node SVID was never renewed"
                    await asyncio.sleep(0.2)
                assert len(api.token_reviews) > reviews   # by attestation, with the refreshed token

        asyncio.run(main())
        assert sum(r.refusals("attestation_required") for r in replicas) == 0
        keys = [p.name for p in (tmp_path / "cred").iterdir() if "PRIVATE KEY" in p.read_text()]
        assert keys == ["credential.key"]   # the node SVID's key: a clientAuth leaf, it signs nothing
    finally:
        for replica in replicas:
            replica.stop()
        api.stop()


def test_a_node_svid_that_expires_during_an_issuer_outage_is_replaced_by_attestation_alone(tmp_path):
    """docs/install-kubernetes.md: a short node SVID costs nothing — with both replicas gone past its
    expiry, the agent rejoins with its token when they return (no credential needed) and renews its
    workload SVIDs. Seen failing with the agent renewing by node credential (it never recovers)."""
    from agent.identity.spiffe import SpiffeId

    from tests.integration.conftest import free_ports
    from tests.integration.test_issuer_agent import build_agent, drive_until

    api = FakeApiServer().start()
    api.put("pods", agent_pod("worker-1"))
    init_ca(TD, tmp_path / "root")
    issue_issuer_files(tmp_path / "root", tmp_path / "issuer")
    config = issuer_config_from_mapping({
        "trust_domain": TD, "ca_dir": str(tmp_path / "issuer"), "dev_short_ttl": True, "node_svid_ttl_seconds": 4,
        "max_svid_ttl_seconds": 8,
        "registry": {"source": "kubernetes", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))},
        "attestation": {"kubernetes": {"enabled": True}}, "rate": {"joins_per_minute": 6000}, "metrics": {"port": 0}})
    ports = free_ports(2)
    replicas = [Replica(config, f"issuer-{i}", port) for i, port in enumerate(ports)]
    token_file = tmp_path / "token"
    token_file.write_text(agent_token(api, "worker-1"))
    (tmp_path / "cred").mkdir(mode=0o700)
    agent = build_agent({
        "node": {"name": "worker-1", "address": "10.0.0.11"}, "capture": {"redirect_address": "169.254.1.1"},
        "trust_domain": TD, "state_dir": str(tmp_path / "state"), "access_log": {"path": "off"},
        "identity": {"mode": "issuer", "svid_ttl_seconds": 8, "dev_short_ttl": True, "poll_seconds": 0.2,
                     "issuer": {"addresses": [f"127.0.0.1:{p}" for p in ports], "credential_dir": str(tmp_path / "cred"),
                                "ca_bundle": str(tmp_path / "root" / "ca.crt"), "timeout_seconds": 2,
                                "service_account_token_file": str(token_file)}}})
    try:
        web = SpiffeId.parse(WEB)
        store = agent.rotator.store
        store.ensure([web])
        drive_until(agent, lambda: web in store)
        credential = agent.rotator.report()["issuer"]["node_credential"]
        for replica in replicas:
            replica.stop()
        replicas = []
        expired_at = datetime.fromisoformat(credential["not_after"])
        drive_until(agent, lambda: datetime.now(timezone.utc) > expired_at + timedelta(seconds=1))
        served = store.svid(web).serial
        replicas = [Replica(config, f"issuer-{i}", port) for i, port in enumerate(ports)]
        drive_until(agent, lambda: agent.rotator.report()["issuer"]["node_credential"]["not_after"]
                    != credential["not_after"] and store.svid(web).serial != served, timeout=40)
        assert datetime.fromisoformat(agent.rotator.report()["issuer"]["node_credential"]["not_after"]) > \
            datetime.now(timezone.utc)
        assert sum(r.refusals("attestation_required") for r in replicas) == 0
    finally:
        for replica in replicas:
            replica.stop()
        api.stop()
