"""The agent with ``registry.source: kubernetes`` (app.py wiring), in-process on loopback with
capture mode ``none``, against the local list/watch server: it starts from the first lists, tells
systemd READY only after that snapshot is in, issues SVIDs for its node's pods only, and follows a
pod deleted later. No root needed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from agent.app import Agent  # noqa: E402
from agent.config import config_from_mapping, validate  # noqa: E402
from agent.identity.ca import init_ca  # noqa: E402
from agent.identity.node_ca import issue_node_files  # noqa: E402
from tests.integration.test_kubernetes_apiserver import FakeApiServer  # noqa: E402

WEB_UID = "5f0c6b1e-2a3d-4c5e-8f70-1a2b3c4d5e6f"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_agent_runs_from_kubernetes_and_reports_ready_after_the_first_snapshot(tmp_path, monkeypatch):
    api = FakeApiServer().start()
    try:
        init_ca("cluster.local", tmp_path / "root")
        issue_node_files(tmp_path / "root", "worker-1", tmp_path / "node-ca")
        (tmp_path / "policies").mkdir()  # an agent without a policy directory does not turn ready
        outbound, inbound, admin = free_ports(3)
        config = validate(config_from_mapping({
            "trust_domain": "cluster.local", "state_dir": str(tmp_path / "state"),
            "node": {"name": "worker-1", "address": "127.0.0.1"},
            "identity": {"node_ca_dir": str(tmp_path / "node-ca")},
            "registry": {"source": "kubernetes", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))},
            "policy": {"dir": str(tmp_path / "policies")},
            "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")},
            "proxy": {"bind_address": "127.0.0.1", "outbound_port": outbound, "inbound_port": inbound,
                      "event_loop": "asyncio"},
            "admin": {"address": "127.0.0.1", "port": admin, "socket": str(tmp_path / "agent.sock")},
            "access_log": {"path": "off"},
        }))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        agent = Agent(config)

        async def main():
            task = asyncio.get_running_loop().create_task(agent.run())
            deadline = time.monotonic() + 20
            message = b""
            while not message:
                assert not task.done(), task.exception() if task.done() else ""
                assert time.monotonic() < deadline, "no READY=1"
                try:
                    message = notify.recv(4096)
                except BlockingIOError:
                    await asyncio.sleep(0.02)
            assert message.startswith(b"READY=1\n")
            # when READY arrives, the Kubernetes snapshot is the agent's registry and SVIDs exist for it
            registry = agent.registry()
            assert {w.key for w in registry.workloads} == {"shop/web-7d4b9c6f5-x2x9k", "shop/cart-5c8d7b9f4-qq7lm",
                                                          "data/postgres-0"}
            assert registry.nodes["worker-2"].address == "10.0.0.12"
            certs = json.loads(await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/debug/certs", timeout=5).read()))
            assert sorted(i["spiffe_id"] for i in certs["identities"]) == [
                "spiffe://cluster.local/ns/shop/sa/cart", "spiffe://cluster.local/ns/shop/sa/web"]
            status = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5).status)
            assert status == 200
            assert [d["source"] for d in agent.workloads.describe()] == ["kubernetes"] * 3

            api.delete("pods", WEB_UID)
            while any(w.name.startswith("web-") for w in agent.registry().workloads):
                assert time.monotonic() < deadline + 10, "the deletion never reached the agent"
                await asyncio.sleep(0.02)
            agent.stop()
            await asyncio.wait_for(task, 20)
            assert notify.recv(4096).startswith(b"STOPPING=1")

        asyncio.run(main())
    finally:
        api.stop()
