"""The Kubernetes registry source against a local list/watch server (test_kubernetes_apiserver.py, the
suite's only stand-in), through the official client, feeding a real WorkloadController whose
capture and identity store record what they are asked to do.

Proves: the first lists make workloads (local ones with their pod cgroups, in both kubelet layouts)
and destinations (every pod, tunnel address = its node's InternalIP); ADDED / MODIFIED / DELETED of
pods and nodes reach the controller as attach / detach / identity changes; a 410 Gone (event or
HTTP status) makes the source list again and pick up what it missed; a dropped stream resumes from
the last resourceVersion without a list; errors back off and recover; list pages are followed; a
snapshot that conflicts with a run-time workload is refused whole, and applied once the conflict is
gone; a local pod whose cgroup appears late is captured once it does. Services and EndpointSlices:
the first lists make the mesh's Services (both ClusterIP families, named target ports) and their
frontends reach the capture; an endpoint turning not ready, a new endpoint, a Service deleted reach
the registry through the watch; the same 410 / dropped-stream handling for both kinds.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import require_module

require_module("kubernetes", "install the kubernetes extra (make setup does: pip install -e '.[test,kubernetes]')",
               module_level=True)

from agent.control.workloads import WorkloadController  # noqa: E402
from agent.registry.kubernetes.source import start_kubernetes_source  # noqa: E402
from agent.registry.kubernetes.watch import Backoff  # noqa: E402
from tests.integration.test_kubernetes_apiserver import FakeApiServer  # noqa: E402

TD = "cluster.local"
NODE = "worker-1"
WEB_UID = "5f0c6b1e-2a3d-4c5e-8f70-1a2b3c4d5e6f"      # BestEffort: systemd driver layout below
CART_UID = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"     # Burstable: cgroupfs driver layout below
POSTGRES_UID = "0d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6"


class RecordingCapture:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def attach(self, workload) -> None:
        self.calls.append(("attach", workload.key, workload.cgroup))

    def detach(self, workload) -> None:
        self.calls.append(("detach", workload.key, workload.cgroup))

    def set_mesh_destinations(self, workloads, services=(), node_ports=()) -> None:  # the capture interface (agent.capture.interface)
        self.mesh = [w.key for w in workloads]
        self.frontends = sorted(services)


class RecordingIdentities:
    def __init__(self) -> None:
        self.current: frozenset = frozenset()

    def ensure(self, identities) -> None:
        self.current = frozenset(identities)


@pytest.fixture
def api():
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cgroup_root(tmp_path) -> Path:
    """A cgroup tree as a kubelet makes it (plain directories: the source only looks for them)."""
    root = tmp_path / "cgroup"
    web = WEB_UID.replace("-", "_")
    (root / f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{web}.slice").mkdir(parents=True)
    (root / f"kubepods/burstable/pod{CART_UID}").mkdir(parents=True)
    return root


class World:
    """The source, its controller and the fake API server, driven from one asyncio loop."""

    def __init__(self, api: FakeApiServer, tmp_path: Path, cgroup_root: Path) -> None:
        self.api = api
        self.capture = RecordingCapture()
        self.identities = RecordingIdentities()
        self.controller = WorkloadController(NODE, TD, "", str(tmp_path / "runtime-workloads.json"), self.capture,
                                             self.identities)
        self.config = SimpleNamespace(registry=SimpleNamespace(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig"))),
                                      node=SimpleNamespace(name=NODE), trust_domain=TD,
                                      capture=SimpleNamespace(cgroup_root=str(cgroup_root)))
        self.source = None
        self._task = None

    async def __aenter__(self) -> "World":
        from agent.registry.kubernetes.source import make_api_client

        self.source = await start_kubernetes_source(
            self.config, self.controller, make_api_client(self.config.registry.kubeconfig),
            backoff_factory=lambda: Backoff(initial=0.05, maximum=0.4), min_interval=0.01, refused_retry=0.2)
        self._task = asyncio.get_running_loop().create_task(self.source.run())
        await self.until(lambda: all(self.api.watching[kind] == 1 for kind in self.api.watching))
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.source.stop)

    @property
    def registry(self):
        return self.controller.snapshot

    def workload(self, key: str):
        return next((w for w in self.registry.workloads if w.key == key), None)

    async def until(self, predicate, timeout: float = 5.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.01)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_first_lists_make_local_workloads_and_remote_destinations(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            registry = world.registry
            assert dict(registry.nodes) == {"worker-1": registry.nodes["worker-1"], "worker-2": registry.nodes["worker-2"]}
            assert registry.nodes["worker-1"].address == "10.0.0.11"     # InternalIP, not ExternalIP/Hostname
            assert registry.nodes["worker-2"].address == "10.0.0.12"
            assert sorted(w.key for w in registry.workloads) == ["data/postgres-0", "shop/cart-5c8d7b9f4-qq7lm",
                                                                 "shop/web-7d4b9c6f5-x2x9k"]
            web, cart, pg = (world.workload(k) for k in ("shop/web-7d4b9c6f5-x2x9k", "shop/cart-5c8d7b9f4-qq7lm",
                                                         "data/postgres-0"))
            assert (web.ip, web.node, web.spiffe_id.uri) == ("10.244.1.5", NODE, "spiffe://cluster.local/ns/shop/sa/web")
            assert web.cgroup == str(cgroup_root / "kubepods.slice/kubepods-besteffort.slice"
                                     f"/kubepods-besteffort-pod{WEB_UID.replace('-', '_')}.slice")
            assert cart.cgroup == str(cgroup_root / f"kubepods/burstable/pod{CART_UID}")
            assert pg.cgroup is None and registry.node_of(pg).address == "10.0.0.12"  # remote: a destination only
            assert registry.by_ip("10.0.0.11") is None, "a hostNetwork pod must not claim its node's IP"
            assert sorted(c[1] for c in world.capture.calls if c[0] == "attach") == [cart.key, web.key]
            assert {i.uri for i in world.identities.current} == {"spiffe://cluster.local/ns/shop/sa/web",
                                                                 "spiffe://cluster.local/ns/shop/sa/cart"}
            assert world.controller.describe()[0]["source"] == "kubernetes"
            skipped = dict(world.source.last.skipped)
            assert "hostNetwork" in skipped["kube-system/kube-proxy-7xk2p"]
            assert "Succeeded" in skipped["shop/migrate-28881000-abcde"]
            assert "no pod IP" in skipped["shop/web-7d4b9c6f5-pend1"]
    run(main())


def test_added_modified_and_deleted_pods_and_nodes_reach_capture_and_identities(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            world.capture.calls.clear()
            # ADDED: a new local pod (Guaranteed, systemd layout) is captured under a new identity
            uid = "44444444-5555-4666-8777-888888888888"
            (cgroup_root / f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice").mkdir()
            pod = copy.deepcopy(api.get("pods", WEB_UID))
            pod["metadata"].update(name="redis-0", namespace="cache", uid=uid)
            pod["spec"]["serviceAccountName"] = "redis"
            pod["status"].update(podIP="10.244.1.20", qosClass="Guaranteed")
            api.put("pods", pod)
            await world.until(lambda: world.workload("cache/redis-0") is not None, what="ADDED pod")
            assert world.capture.calls[-1][:2] == ("attach", "cache/redis-0")
            assert any(i.uri.endswith("/ns/cache/sa/redis") for i in world.identities.current)

            # MODIFIED: a local pod's service account changes → detached and attached under the new identity
            cart = api.get("pods", CART_UID)
            cart["spec"]["serviceAccountName"] = "cart-v2"
            api.put("pods", cart)
            await world.until(lambda: world.workload("shop/cart-5c8d7b9f4-qq7lm").service_account == "cart-v2")
            assert ("detach", "shop/cart-5c8d7b9f4-qq7lm", cart_cgroup(cgroup_root)) in world.capture.calls
            assert world.capture.calls[-1][:2] == ("attach", "shop/cart-5c8d7b9f4-qq7lm")

            # MODIFIED: a remote pod's IP changes → the destination moves, nothing is attached here
            calls = len(world.capture.calls)
            pg = api.get("pods", POSTGRES_UID)
            pg["status"].update(podIP="10.244.2.8", podIPs=[{"ip": "10.244.2.8"}])
            api.put("pods", pg)
            await world.until(lambda: world.registry.by_ip("10.244.2.8") is not None)
            assert world.registry.by_ip("10.244.2.7") is None and len(world.capture.calls) == calls

            # MODIFIED node: worker-2's InternalIP changes → its pods' tunnel address follows
            node = api.get("nodes", "worker-2")
            node["status"]["addresses"][0]["address"] = "10.0.0.22"
            api.put("nodes", node)
            await world.until(lambda: world.registry.nodes["worker-2"].address == "10.0.0.22")
            assert world.registry.node_of(world.workload("data/postgres-0")).address == "10.0.0.22"

            # DELETED: the pod is detached and its identity leaves the node
            api.delete("pods", uid)
            await world.until(lambda: world.workload("cache/redis-0") is None, what="DELETED pod")
            assert world.capture.calls[-1][:2] == ("detach", "cache/redis-0")
            assert not any(i.uri.endswith("/ns/cache/sa/redis") for i in world.identities.current)

            # a node that goes away takes its pods out of the mesh (nothing to tunnel to)
            api.delete("nodes", "worker-2")
            await world.until(lambda: "worker-2" not in world.registry.nodes)
            assert world.workload("data/postgres-0") is None
            assert world.source.pods.stats.lists == 1 and world.source.pods.stats.errors == 0
    run(main())


def cart_cgroup(root: Path) -> str:
    return str(root / f"kubepods/burstable/pod{CART_UID}")


@pytest.mark.parametrize("how", ["error event", "http status"])
def test_410_gone_lists_again_and_catches_up_with_what_the_watch_missed(api, tmp_path, cgroup_root, how):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            # changes the source never hears of as events (as if compacted away while it was behind)
            api.delete("pods", CART_UID, silent=True)
            pg = api.get("pods", POSTGRES_UID)
            pg["spec"]["serviceAccountName"] = "postgres-admin"
            api.put("pods", pg, silent=True)
            if how == "error event":
                api.script("pods", "gone")
            else:   # the stream ends; the next watch request is answered 410
                api.fail("pods", 410)
                api.script("pods", "end")
            await world.until(lambda: world.workload("shop/cart-5c8d7b9f4-qq7lm") is None, what="re-list")
            assert world.workload("data/postgres-0").service_account == "postgres-admin"
            assert ("detach", "shop/cart-5c8d7b9f4-qq7lm", cart_cgroup(cgroup_root)) in world.capture.calls
            stats = world.source.pods.stats
            assert stats.lists == 2 and stats.relists_gone == 1 and stats.errors == 0
            # and it watches again, from the new list's resourceVersion
            await world.until(lambda: api.watching["pods"] == 1)
            assert api.watch_requests("pods")[-1]["resourceVersion"] == api.list_requests("pods")[-1].get(
                "resourceVersion", api.watch_requests("pods")[-1]["resourceVersion"])
            assert int(api.watch_requests("pods")[-1]["resourceVersion"]) == api.rv
    run(main())


def test_a_dropped_stream_resumes_from_the_last_resource_version_without_a_list(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            cart = api.get("pods", CART_UID)
            cart["metadata"]["labels"]["version"] = "2"
            seen = api.put("pods", cart)["metadata"]["resourceVersion"]
            api.script("pods", "drop")
            await world.until(lambda: world.source.pods.stats.errors == 1, what="the dropped stream")
            api.delete("pods", CART_UID)                   # happens while no watch is open
            await world.until(lambda: world.workload("shop/cart-5c8d7b9f4-qq7lm") is None, what="replayed event")
            watches = api.watch_requests("pods")
            assert len(watches) == 2 and watches[1]["resourceVersion"] == seen
            assert world.source.pods.stats.lists == 1, "a dropped stream must resume, not list again"
            assert "ProtocolError" in world.source.pods.stats.last_error or "Incomplete" in world.source.pods.stats.last_error
    run(main())


def test_errors_back_off_exponentially_and_the_source_recovers(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            api.fail("pods", 503, 500, 503)
            api.script("pods", "end")                       # the open stream ends; the next three requests fail
            await world.until(lambda: world.source.pods.stats.errors == 3, what="three failures")
            await world.until(lambda: api.watching["pods"] == 1, what="a watch again")
            delays = world.source.pods.stats.backoff_delays
            assert len(delays) == 3 and delays[0] < delays[1] < delays[2]
            assert "HTTP 500" in world.source.pods.stats.last_error or "HTTP 503" in world.source.pods.stats.last_error
            api.delete("pods", WEB_UID)
            await world.until(lambda: world.workload("shop/web-7d4b9c6f5-x2x9k") is None, what="recovery")
            assert world.source.pods.backoff.failures == 0, "a working watch resets the backoff"
    run(main())


def test_lists_follow_continue_tokens(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            world.source.pods.page_size = 2
            api.delete("pods", WEB_UID, silent=True)
            api.script("pods", "gone")
            expected = ["data/postgres-0", "shop/cart-5c8d7b9f4-qq7lm"]
            # the list counter moves before the snapshot is applied: wait for what the user sees
            await world.until(lambda: world.source.pods.stats.lists == 2
                              and sorted(w.key for w in world.registry.workloads) == expected,
                              what="the paged relist applied")
            pages = api.list_requests("pods")[1:]
            assert [p.get("continue") for p in pages] == [None, "2", "4"] and all(p["limit"] == "2" for p in pages)
    run(main())


def test_a_snapshot_conflicting_with_a_runtime_workload_is_refused_whole(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            world.controller.add({"name": "legacy-vm", "namespace": "ops", "service_account": "legacy",
                                  "ip": "10.244.1.30", "node": NODE})
            before = world.controller.snapshot
            pod = api.get("pods", WEB_UID)
            pod["metadata"].update(name="web-new", uid="55555555-6666-4777-8888-999999999999")
            pod["status"]["podIP"] = "10.244.1.30"           # the run-time workload's IP
            api.put("pods", pod)
            cart = api.get("pods", CART_UID)
            cart["spec"]["serviceAccountName"] = "cart-v3"   # in the same snapshot: must not apply either
            api.put("pods", cart)
            await world.until(lambda: world.controller.file_errors >= 1, what="the refused snapshot")
            assert world.controller.snapshot is before
            assert world.workload("shop/cart-5c8d7b9f4-qq7lm").service_account == "cart"
            # the conflict goes away without any Kubernetes event: the refused snapshot is offered again
            world.controller.remove("ops/legacy-vm")
            await world.until(lambda: world.workload("shop/cart-5c8d7b9f4-qq7lm").service_account == "cart-v3",
                              what="the refused snapshot applied once the conflict is gone")
            assert world.workload("shop/web-new").ip == "10.244.1.30"
    run(main())


def test_a_local_pod_whose_cgroup_appears_late_is_captured_when_it_does(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            uid = "66666666-7777-4888-8999-aaaaaaaaaaaa"
            pod = api.get("pods", WEB_UID)
            pod["metadata"].update(name="late", uid=uid)
            pod["status"]["podIP"] = "10.244.1.40"
            api.put("pods", pod)
            await world.until(lambda: world.workload("shop/late") is not None)
            assert world.workload("shop/late").cgroup is None and world.source.last.missing_cgroups == ("shop/late",)
            cgroup = cgroup_root / f"kubepods/besteffort/pod{uid}"   # no event: found by the periodic look
            cgroup.mkdir(parents=True)
            await world.until(lambda: world.workload("shop/late").cgroup == str(cgroup), what="the late cgroup")
            assert world.capture.calls[-1] == ("attach", "shop/late", str(cgroup))
    run(main())


WEB_SERVICE_UID = "0c0c0c0c-0000-4000-8000-000000000002"
WEB_SLICE_UID = "0d0d0d0d-0000-4000-8000-000000000002"
PG_SLICE_UID = "0d0d0d0d-0000-4000-8000-000000000003"


def service_of(world, key: str):
    return next((s for s in world.registry.services if s.key == key), None)


def ready_endpoints(world, address: str, port: int) -> list[str]:
    frontend = world.registry.service_at(address, port)
    return [] if frontend is None else [w.key for w in frontend[2]]


def test_first_lists_make_services_whose_frontends_reach_the_capture(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            assert [s.key for s in world.registry.services] == ["data/postgres", "shop/web"]
            web = service_of(world, "shop/web")
            assert web.addresses == ("10.96.12.30", "fd00:10:96::1e") and web.ports[0].target_port == 8080
            assert world.capture.frontends == [("10.96.12.30", 80), ("10.96.40.7", 5432), ("fd00:10:96::1e", 80)]
            assert ready_endpoints(world, "10.96.40.7", 5432) == ["data/postgres-0"]
            skipped = dict(world.source.last.services_skipped)
            assert "default/kubernetes" in skipped and "headless" in skipped["data/postgres-headless"]
            assert all(w.stats.lists == 1 and w.stats.errors == 0 for w in world.source.watches)
    run(main())


def test_endpoint_and_service_changes_reach_the_registry_through_the_watch(api, tmp_path, cgroup_root):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            # MODIFIED EndpointSlice: postgres-0 turns not ready (terminating) → no endpoint for new connections
            pg = api.get("endpointslices", PG_SLICE_UID)
            pg["endpoints"][0]["conditions"] = {"ready": False, "serving": False, "terminating": True}
            api.put("endpointslices", pg)
            await world.until(lambda: ready_endpoints(world, "10.96.40.7", 5432) == [], what="not ready")
            assert service_of(world, "data/postgres").endpoints[0].ready is False   # kept: open ones continue
            # a second endpoint (cart, by address only) joins the web Service, ready
            web = api.get("endpointslices", WEB_SLICE_UID)
            web["endpoints"].append({"addresses": ["10.244.1.9"], "conditions": {"ready": True}})
            api.put("endpointslices", web)
            await world.until(lambda: len(ready_endpoints(world, "10.96.12.30", 80)) == 2, what="new endpoint")
            # MODIFIED Service: a new port; then DELETED: its frontends leave the capture
            svc = api.get("services", WEB_SERVICE_UID)
            svc["spec"]["ports"].append({"name": "admin", "protocol": "TCP", "port": 9000, "targetPort": 9000})
            api.put("services", svc)
            await world.until(lambda: ("10.96.12.30", 9000) in world.capture.frontends, what="new port")
            api.delete("services", WEB_SERVICE_UID)
            await world.until(lambda: service_of(world, "shop/web") is None, what="deleted service")
            assert world.capture.frontends == [("10.96.40.7", 5432)]
            assert world.source.services.stats.lists == 1 and world.source.endpoint_slices.stats.lists == 1
    run(main())


@pytest.mark.parametrize("kind", ["services", "endpointslices"])
def test_410_gone_and_dropped_streams_of_services_and_endpoint_slices(api, tmp_path, cgroup_root, kind):
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            watch = {"services": world.source.services, "endpointslices": world.source.endpoint_slices}[kind]
            if kind == "services":
                api.delete("services", WEB_SERVICE_UID, silent=True)      # missed: only a re-list sees it
            else:
                api.delete("endpointslices", WEB_SLICE_UID, silent=True)
            api.script(kind, "gone")
            await world.until(lambda: service_of(world, "shop/web") is None, what="re-list after 410")
            assert watch.stats.relists_gone == 1 and watch.stats.lists == 2 and watch.stats.errors == 0
            await world.until(lambda: api.watching[kind] == 1, what="watching again")
            # a stream cut mid-chunk resumes from the last resourceVersion, without a list
            api.script(kind, "drop")
            await world.until(lambda: watch.stats.errors == 1, what="the dropped stream")
            if kind == "services":
                pg = api.get("services", "0c0c0c0c-0000-4000-8000-000000000003")
                pg["spec"]["ports"][0]["port"] = 5433
                api.put("services", pg)
                await world.until(lambda: world.registry.service_at("10.96.40.7", 5433) is not None,
                                  what="event after resume")
            else:
                pg = api.get("endpointslices", PG_SLICE_UID)
                pg["endpoints"][0]["conditions"]["ready"] = False
                api.put("endpointslices", pg)
                await world.until(lambda: ready_endpoints(world, "10.96.40.7", 5432) == [], what="event after resume")
            assert watch.stats.lists == 2, "a dropped stream must resume, not list again"
    run(main())


def _watch_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


def test_stop_ends_every_watch_thread_while_streams_are_open_and_a_list_dribbles(api, tmp_path, cgroup_root):
    """The agent's and the issuer's stop: every watch thread ends within the stop's bound and none is left — not
    the ones reading a watch stream, and not one in the middle of a list whose body the API server dribbles (a
    re-list after 410 Gone, here). Seen failing before: the listing thread was not woken, outlived the stop (5 s
    per watch, one after another), then opened a watch after it had been stopped and read it for minutes."""
    async def main():
        async with World(api, tmp_path, cgroup_root) as world:
            assert set(_watch_threads()) == {"k8s-watch-pods", "k8s-watch-nodes", "k8s-watch-services",
                                              "k8s-watch-endpointslices"}
            lists = len(api.list_requests("pods"))
            api.dribble("pods", 60.0)
            api.script("pods", "gone")   # the pods watch lists again: that list's body takes a minute
            await world.until(lambda: len(api.list_requests("pods")) > lists, what="the re-list")
            await asyncio.sleep(0.3)     # its headers are in, its body is dribbling
            started = time.monotonic()
            ended = await asyncio.get_running_loop().run_in_executor(None, world.source.stop)
            assert _watch_threads() == [], f"left after stop ({time.monotonic() - started:.1f}s)"
            assert ended and time.monotonic() - started < 2.0
            watches = len(api.watch_requests("pods"))
            await asyncio.sleep(0.5)
            assert len(api.watch_requests("pods")) == watches, "a watch was opened after the stop"

    run(main())
