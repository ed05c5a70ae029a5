"""The agent with ``registry.source: kubernetes`` (app.py wiring), in-process on loopback with
capture mode ``none``, against the local list/watch server: it starts from the first lists, tells
systemd READY only after that snapshot is in, issues SVIDs for its node's pods only, and follows a
pod deleted later. No root needed."""

from __future__ import annotations

import asyncio
import json
import logging
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


def source_up(metrics: str) -> float:
    values = [float(line.split()[1]) for line in metrics.splitlines() if line.startswith("tcpmesh_registry_source_up ")]
    assert values, "no tcpmesh_registry_source_up on /metrics"
    return values[0]


def test_the_api_going_away_keeps_the_last_state_says_so_and_converges_on_its_return(in_process_agent, tmp_path,
                                                                                      caplog):
    """docs/registry.md "When the API server goes away": the agent stays ready and keeps the last
    snapshot; /readyz (still 200) and tcpmesh_registry_source_up say it is stale; the watches retry
    with jittered exponential backoff; on return the agent catches up — here with a pod deleted
    meanwhile that no watch event reports (the server's history no longer reaches back: 410, re-list)."""
    caplog.set_level(logging.INFO, logger="tcpmesh.registry.kubernetes")
    api = FakeApiServer().start()
    try:
        proc = kubernetes_agent(in_process_agent, api, tmp_path)
        agent = proc.agent

        async def main():
            async with proc.running():
                assert (await proc.next_message()).startswith(b"READY=1\n")
                known = {w.key for w in agent.registry().workloads}
                assert source_up((await proc.http_get("/metrics"))[1]) == 1
                assert await proc.readyz() == (200, "ready\n")

                api.go_away()
                pods = agent.kubernetes.pods.stats
                await until(lambda: len(pods.backoff_delays) >= 3, "the pods watch never retried")
                status, body = await proc.readyz()
                assert status == 200, "an agent serving the last known state stays ready"
                assert "the Kubernetes API has not answered since" in body, body
                assert "serving the last known state (3 pods, 2 nodes)" in body, body
                assert source_up((await proc.http_get("/metrics"))[1]) == 0
                delays = pods.backoff_delays[:3]
                assert delays[0] < delays[1] < delays[2], delays           # exponential
                assert [round(d / 0.5, 6) for d in delays] != [1, 2, 4], delays  # jittered
                assert {w.key for w in agent.registry().workloads} == known, "the last known state must stay"

                api.delete("pods", WEB_UID, silent=True)   # while it is away; no event will ever say so
                api.fail("pods", 410)                       # the resumed watch is too old: list again
                api.come_back()
                await until(lambda: not any(w.name.startswith("web-") for w in agent.registry().workloads),
                            "the pod deleted while the API was away is still in the registry")
                await until(lambda: not agent.kubernetes.unreachable(), "the source never recovered")
                assert await proc.readyz() == (200, "ready\n")
                assert source_up((await proc.http_get("/metrics"))[1]) == 1
                assert pods.relists_gone >= 1
                assert any("the Kubernetes API answers again" in r.getMessage() for r in caplog.records)

        asyncio.run(main())
    finally:
        api.stop()
