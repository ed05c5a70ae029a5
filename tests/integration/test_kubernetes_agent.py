"""The agent with ``registry.source: kubernetes`` (app.py wiring), in-process on loopback with
capture mode ``none``, against the local list/watch server: it starts from the first lists, tells
systemd READY only after that snapshot is in, issues SVIDs for its node's pods only, and follows a
pod deleted later. No root needed."""

from __future__ import annotations

import asyncio
import json
import time

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from tests.integration.test_kubernetes_apiserver import FakeApiServer  # noqa: E402

WEB_UID = "5f0c6b1e-2a3d-4c5e-8f70-1a2b3c4d5e6f"


def kubernetes_agent(in_process_agent, api: FakeApiServer, tmp_path):
    return in_process_agent("cluster.local", "worker-1", registry={
        "source": "kubernetes", "kubeconfig": str(api.kubeconfig(tmp_path / "kubeconfig"))})


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_agent_runs_from_kubernetes_and_reports_ready_after_the_first_snapshot(in_process_agent, tmp_path):
    api = FakeApiServer().start()
    try:
        proc = kubernetes_agent(in_process_agent, api, tmp_path)
        agent = proc.agent

        async def main():
            async with proc.running():
                assert (await proc.next_message()).startswith(b"READY=1\n")
                # when READY arrives, the Kubernetes snapshot is the agent's registry and SVIDs exist for it
                registry = agent.registry()
                assert {w.key for w in registry.workloads} == {"shop/web-7d4b9c6f5-x2x9k", "shop/cart-5c8d7b9f4-qq7lm",
                                                              "data/postgres-0"}
                assert registry.nodes["worker-2"].address == "10.0.0.12"
                status, body = await proc.http_get("/debug/certs")
                assert sorted(i["spiffe_id"] for i in json.loads(body)["identities"]) == [
                    "spiffe://cluster.local/ns/shop/sa/cart", "spiffe://cluster.local/ns/shop/sa/web"]
                assert (await proc.readyz())[0] == 200
                assert [d["source"] for d in agent.workloads.describe()] == ["kubernetes"] * 3

                api.delete("pods", WEB_UID)
                await until(lambda: not any(w.name.startswith("web-") for w in agent.registry().workloads),
                            "the deletion never reached the agent")
            assert (await proc.next_message()).startswith(b"STOPPING=1")

        asyncio.run(main())
    finally:
        api.stop()
