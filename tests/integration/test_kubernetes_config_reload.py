"""The DaemonSet's config is a ConfigMap mounted as a directory (deploy/kubernetes/03-daemonset.yaml, no
``subPath``): an edit reaches the pod as the kubelet's ``..data`` symlink swap, and the agent — with
``config_file.watch`` on, as the ConfigMap sets it — applies it without a restart, through the same
reload as `tcpmesh identity reload`. Here: a real in-process agent on loopback (capture ``none``) with
the Kubernetes registry from the list/watch stand-in, started from a kubelet-shaped config directory.

- An edit of the identity source (a new node CA directory) is applied: SVIDs re-issued from it, new
  TLS handshakes get the new certificate, a tunnel opened before keeps its connection; a field that
  needs a restart is named with old → new and the rollout command.
- A broken edit is refused: the last good config keeps serving, and the log, `tcpmesh status` and
  /metrics say which file and field; the fixed edit then applies.
Both seen failing before the watch existed (the agent never re-read its file)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

import pytest
import yaml

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from agent.identity.ca import load_ca  # noqa: E402
from agent.identity.issue import issue_svid  # noqa: E402
from agent.identity.node_ca import issue_node_files  # noqa: E402
from agent.identity.spiffe import SpiffeId  # noqa: E402
from agent.identity.tls import ALPN  # noqa: E402
from tests.integration.kubelet_volume import ConfigMapVolume  # noqa: E402
from tests.integration.test_kubernetes_apiserver import FakeApiServer  # noqa: E402

TD = "cluster.local"
WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/data/sa/postgres")   # a peer node's workload
WATCH = {"watch": True, "poll_seconds": 0.2}


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.fixture
def world(in_process_agent, tmp_path):
    api = FakeApiServer().start()
    volume = ConfigMapVolume(tmp_path / "etc-tcpmesh-config")   # the pod's /etc/tcpmesh/config
    # handshake_timeout_seconds 25: a tunnel with no stream in it yet stays open that long (5 s by default),
    # so "the tunnel opened before the edit is still there" does not race the clock under load
    proc = in_process_agent(TD, "worker-1", config_writer=volume.writer(), config_file=WATCH,
                            proxy={"handshake_timeout_seconds": 25.0},
                            registry={"source": "kubernetes", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))})
    try:
        yield proc, volume, tmp_path
    finally:
        api.stop()


def edit(volume: ConfigMapVolume, change) -> None:
    """`kubectl edit configmap tcpmesh-config`, as the pod sees it a little later."""
    doc = yaml.safe_load((volume.directory / "config.yaml").read_text())
    change(doc)
    volume.write({"config.yaml": yaml.safe_dump(doc)})


def client_context(tmp_path) -> ssl.SSLContext:
    """A peer node's workload SVID from the root (the handshake proves a mesh identity)."""
    svid = issue_svid(load_ca(tmp_path / "root"), CLIENT, 600)
    (tmp_path / "client.pem").write_text(svid.cert_pem + "".join(svid.chain_pem))
    (tmp_path / "client.key").write_text(svid.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    ctx.load_verify_locations(tmp_path / "root" / "ca.crt")
    ctx.check_hostname = False
    ctx.set_alpn_protocols([ALPN])
    return ctx


async def tunnel(proc, ctx):
    """An mTLS tunnel to the agent's inbound port as a peer would open one; the certificate it presented."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.inbound, ssl=ctx, server_hostname=WEB.sni)
    return reader, writer, writer.get_extra_info("ssl_object").getpeercert(binary_form=True)


async def still_open(reader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 0.5)
    except asyncio.TimeoutError:
        return True   # nothing to read and no EOF: the connection is there
    return bool(data)


async def status(proc) -> dict:
    code, body = await proc.http_get("/debug/status")
    assert code == 200, body
    return json.loads(body)


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return values[0] if values else 0.0


def test_a_configmap_edit_is_applied_without_a_restart_and_open_tunnels_stay(world, caplog):
    proc, volume, tmp_path = world
    caplog.set_level(logging.INFO, logger="tcpmesh")
    issue_node_files(tmp_path / "root", "worker-1", tmp_path / "node-ca-2")   # the operator's new intermediate
    ctx = client_context(tmp_path)

    async def main():
        async with proc.running() as task:
            assert (await proc.next_message()).startswith(b"READY=1\n")
            before = json.loads((await proc.http_get("/debug/certs"))[1])
            assert before["node_ca"]["source"].startswith(str(tmp_path / "node-ca"))
            reader, writer, first_cert = await tunnel(proc, ctx)

            edit(volume, lambda doc: (doc["identity"].update(node_ca_dir=str(tmp_path / "node-ca-2")),
                                      doc["proxy"].update(max_connections=20000)))

            async def switched():
                certs = json.loads((await proc.http_get("/debug/certs"))[1])
                return certs["node_ca"]["source"].startswith(str(tmp_path / "node-ca-2"))
            await until(switched, "the ConfigMap edit (kubelet ..data swap) never reached the running agent")
            assert not task.done(), "the agent restarted"
            assert await proc.readyz() == (200, "ready\n")
            assert await still_open(reader), "the tunnel opened before the edit was cut"
            _, writer2, new_cert = await tunnel(proc, ctx)
            assert new_cert != first_cert, "a new handshake still gets the certificate of the old node CA"
            writer2.close()
            writer.close()

            doc = await status(proc)
            config = doc["config"]
            assert config["watch"] and config["last_reload"]["trigger"] == "watch"
            assert config["last_reload"]["result"] == "applied" and config["refused"] is None
            assert config["restart_needed"] == [{"field": "proxy.max_connections", "old": 32768, "new": 20000}]
            (waiting,) = [p for p in doc["problems"] if "wait for a restart" in p]
            assert "proxy.max_connections 32768 → 20000" in waiting
            assert "kubectl -n tcpmesh-system rollout restart ds/tcpmesh-agent" in waiting
            metrics = (await proc.http_get("/metrics"))[1]
            assert metric(metrics, 'tcpmesh_config_reloads_total{result="applied",trigger="watch"}') == 1
            assert metric(metrics, "tcpmesh_config_restart_needed_fields ") == 1

        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "needs a restart: proxy.max_connections 32768 → 20000" in logged, logged

    asyncio.run(main())


def test_a_broken_configmap_edit_is_refused_loudly_and_the_last_good_config_keeps_serving(world, caplog):
    proc, volume, tmp_path = world
    caplog.set_level(logging.INFO, logger="tcpmesh")
    ctx = client_context(tmp_path)

    async def main():
        async with proc.running() as task:
            assert (await proc.next_message()).startswith(b"READY=1\n")
            serial = json.loads((await proc.http_get("/debug/certs"))[1])["identities"][0]["serial"]
            _, writer, first_cert = await tunnel(proc, ctx)
            writer.close()

            edit(volume, lambda doc: doc["identity"].update(mode="isuer"))   # a typo

            async def refused():
                return bool((await status(proc))["config"].get("refused"))
            await until(refused, "the broken edit was never reported by `tcpmesh status`")
            doc = await status(proc)
            error = doc["config"]["refused"]["error"]
            assert str(volume.directory / "config.yaml") in error and "identity.mode" in error, error
            assert "'isuer'" in error and "last good config" in error, error
            assert any(p.startswith("config file change refused, the last good config keeps running")
                       for p in doc["problems"]), doc["problems"]
            metrics = (await proc.http_get("/metrics"))[1]
            assert metric(metrics, 'tcpmesh_config_reloads_total{result="refused",trigger="watch"}') == 1
            assert metric(metrics, "tcpmesh_config_file_refused ") == 1
            # the last good config serves on: ready, same SVIDs, same certificate for a new tunnel
            assert not task.done() and await proc.readyz() == (200, "ready\n")
            assert json.loads((await proc.http_get("/debug/certs"))[1])["identities"][0]["serial"] == serial
            _, writer, cert = await tunnel(proc, ctx)
            writer.close()
            assert cert == first_cert

            edit(volume, lambda doc: doc["identity"].update(mode="node_ca"))   # fixed

            async def cleared():
                return (await status(proc))["config"].get("refused") is None
            await until(cleared, "the fixed edit did not clear the refusal")
            assert metric((await proc.http_get("/metrics"))[1], "tcpmesh_config_file_refused ") == 0

        logged = [r for r in caplog.records if r.levelno >= logging.ERROR and "refused" in r.getMessage()]
        assert logged and "identity.mode" in logged[0].getMessage(), [r.getMessage() for r in caplog.records]

    asyncio.run(main())


def test_the_migration_to_the_issuer_on_kubernetes_is_a_configmap_edit_no_pod_restarts(in_process_agent, tmp_path):
    """docs/identity.md "Migrating to the issuer", step 2 on Kubernetes: the agent runs on a node
    intermediate; the ConfigMap's identity section becomes deploy/kubernetes/02-config.yaml's (paths into
    the test's directory); the running agent joins the issuer by attestation with its pod's token, gets
    its node's SVIDs from it and swaps — the tunnel opened before stays, new handshakes get the issuer's
    certificate. The issuer's Service answers only after the edit: the switch is refused first (the agent
stays on its node CA, says so) and the watch tries the same file again until it applies. Before the
directory mount and the watch this was a rolling restart of the DaemonSet."""
    from agent.identity.issuer_ca import issue_issuer_files
    from tests.integration.conftest import free_ports
    from tests.integration.issuer_world import Replica
    from tests.integration.test_kubernetes_attestation import AGENT_UIDS, agent_pod, agent_token, issuer_config
    from tests.unit.test_kubernetes_manifests import find

    api = FakeApiServer().start()
    replica = None
    try:
        for node in AGENT_UIDS:
            api.put("pods", agent_pod(node))
        volume = ConfigMapVolume(tmp_path / "etc-tcpmesh-config")
        proc = in_process_agent(TD, "worker-1", config_writer=volume.writer(), config_file=WATCH,
                                proxy={"handshake_timeout_seconds": 25.0},
                                registry={"source": "kubernetes",
                                          "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))})
        issue_issuer_files(tmp_path / "root", tmp_path / "issuer")   # from the root the fixture made
        (port,) = free_ports(1)   # the issuer's Service: not answering yet when the ConfigMap is edited
        token_file = tmp_path / "projected" / "token"                # the projected volume
        token_file.parent.mkdir()
        token_file.write_text(agent_token(api, "worker-1"))
        (tmp_path / "cred").mkdir(mode=0o700)                        # the emptyDir
        identity = yaml.safe_load(find("ConfigMap", "tcpmesh-config")["data"]["config.yaml"])["identity"]
        identity["issuer"].update(addresses=[f"127.0.0.1:{port}"], service_account_token_file=str(token_file),
                                  ca_bundle=str(tmp_path / "root" / "ca.crt"), credential_dir=str(tmp_path / "cred"))
        ctx = client_context(tmp_path)

        async def main():
            async with proc.running() as task:
                assert (await proc.next_message()).startswith(b"READY=1\n")
                reader, writer, first_cert = await tunnel(proc, ctx)

                edit(volume, lambda doc: doc.update(identity=identity))

                async def refused():
                    return bool((await status(proc))["config"].get("refused"))
                await until(refused, "an edit whose issuer does not answer was not reported")
                error = (await status(proc))["config"]["refused"]["error"]
                assert "no issuer answered" in error and "stays on identity.mode node_ca" in error, error
                assert json.loads((await proc.http_get("/debug/certs"))[1])["node_ca"]["kind"].startswith("node intermediate")
                nonlocal replica
                replica = Replica(issuer_config(tmp_path, api), "issuer-0", port)   # the issuer comes up

                async def on_issuer():
                    return json.loads((await proc.http_get("/debug/certs"))[1])["node_ca"]["kind"].startswith("issuer")
                await until(on_issuer, "the watch never tried the ConfigMap's identity.mode issuer again", 60)
                certs = json.loads((await proc.http_get("/debug/certs"))[1])
                assert sorted(i["spiffe_id"] for i in certs["identities"]) == [
                    "spiffe://cluster.local/ns/shop/sa/cart", str(WEB.uri)]
                assert certs["issuer"]["node_credential"]["spiffe_id"] == f"spiffe://{TD}/node/worker-1"
                assert not task.done() and await proc.readyz() == (200, "ready\n")
                assert await still_open(reader), "the tunnel opened before the switch was cut"
                _, writer2, new_cert = await tunnel(proc, ctx)
                assert new_cert != first_cert
                writer2.close()
                writer.close()
                config = (await status(proc))["config"]
                assert config["last_reload"]["result"] == "applied" and config["restart_needed"] == []
                assert config["refused"] is None

        asyncio.run(main())
        assert len(api.token_reviews) >= 1   # joined by attestation, no token handed out
    finally:
        if replica is not None:
            replica.stop()
        api.stop()
