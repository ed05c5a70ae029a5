"""The Kubernetes registry source (``registry.source: kubernetes``): four watch loops (pods, Services
and EndpointSlices in every namespace, nodes) → registry snapshots for the agent's WorkloadController.

``KubernetesSource`` runs ``watch.WatchLoop`` for each of them, builds a snapshot with
``mapping.build_registry`` after every change (coalesced, at most one per ``min_interval``), finds
local pods' cgroups with ``cgroups.find_pod_cgroup`` (looked up again while missing), and hands each
changed snapshot to ``on_snapshot`` (``WorkloadController.replace_base``, all or nothing; a refused
one is offered again). ``start_kubernetes_source`` is what the composition root calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from agent.errors import ConfigError, TcpmeshError
from agent.registry.kubernetes.cgroups import find_pod_cgroup
from agent.registry.kubernetes.mapping import IPV6_ONLY, BuildResult, build_registry
from agent.registry.kubernetes.watch import LIST_READ_TIMEOUT_SECONDS, WATCH_TIMEOUT_SECONDS, Backoff, WatchLoop
from agent.registry.model import Registry

log = logging.getLogger("tcpmesh.registry.kubernetes")

FIRST_SYNC_TIMEOUT_SECONDS = 60.0
MIN_PUBLISH_INTERVAL_SECONDS = 0.2   # bursts of events (a rollout) become one snapshot
CGROUP_RETRY_SECONDS = 1.0           # a local pod whose cgroup is not there yet is looked up again
REFUSED_RETRY_SECONDS = 10.0         # a snapshot the controller refused is offered again (a conflict may clear)
STOP_SECONDS = 5.0                   # at stop, for every watch thread together (a woken one ends in milliseconds)


def make_api_client(kubeconfig: str = "") -> Any:
    """The official client, from ``kubeconfig`` or (empty) the pod's service account."""
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise ConfigError("registry.source", "kubernetes", "needs the kubernetes Python package",
                          "install tcpmesh with the kubernetes extra: pip install 'tcpmesh[kubernetes]'") from exc
    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=kubeconfig)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException as exc:
        where = kubeconfig or "the in-cluster service account (KUBERNETES_SERVICE_HOST, /var/run/secrets/...)"
        raise ConfigError("registry.kubeconfig", kubeconfig, f"cannot configure the Kubernetes client from {where}: "
                          f"{exc}", "run the agent in the DaemonSet, or set registry.kubeconfig") from exc


class KubernetesSource:
    """Pods, nodes, Services, EndpointSlices → registry snapshots for the WorkloadController (``on_snapshot``)."""

    def __init__(self, api_client: Any, node_name: str, trust_domain: str, cgroup_root: str,
                 on_snapshot: Callable[[Registry], Any], *, watch_timeout: int = WATCH_TIMEOUT_SECONDS,
                 backoff_factory: Callable[[], Backoff] = Backoff,
                 min_interval: float = MIN_PUBLISH_INTERVAL_SECONDS,
                 refused_retry: float = REFUSED_RETRY_SECONDS, services: bool = True,
                 forbidden_hint: str | None = None) -> None:
        from kubernetes import client

        self.node_name = node_name
        self.trust_domain = trust_domain
        self.cgroup_root = cgroup_root
        self.on_snapshot = on_snapshot
        self.min_interval = min_interval
        self.refused_retry = refused_retry
        self._warned: frozenset[str] = frozenset()  # IPv6-only pods already warned about (once per pod)
        core = client.CoreV1Api(api_client)
        hint = {} if forbidden_hint is None else {"forbidden_hint": forbidden_hint}   # the issuer's RBAC, not ours
        self.pods = WatchLoop("pods", core.list_pod_for_all_namespaces, lambda o: o["metadata"]["uid"],
                              self._changed, watch_timeout=watch_timeout, backoff=backoff_factory(), **hint)
        self.nodes = WatchLoop("nodes", core.list_node, lambda o: o["metadata"]["name"],
                               self._changed, watch_timeout=watch_timeout, backoff=backoff_factory(), **hint)
        self.watches: tuple[WatchLoop, ...] = (self.pods, self.nodes)
        self.services: WatchLoop | None = None
        self.endpoint_slices: WatchLoop | None = None
        if services:   # services=False: pods and nodes only (the issuer's placement needs no more, nor its RBAC)
            self.services = WatchLoop("services", core.list_service_for_all_namespaces,
                                      lambda o: o["metadata"]["uid"], self._changed, watch_timeout=watch_timeout,
                                      backoff=backoff_factory())
            self.endpoint_slices = WatchLoop(
                "endpointslices", client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
                lambda o: o["metadata"]["uid"], self._changed, watch_timeout=watch_timeout, backoff=backoff_factory())
            self.watches += (self.services, self.endpoint_slices)
        self.published = 0
        self.last: BuildResult | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._cgroups: dict[str, str] = {}   # pod uid → cgroup dir (found once, kept while the pod lives)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        for watch in self.watches:
            watch.start()

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """End every watch thread within ``timeout`` in all (each is woken at once; they end together); True if
        they all ended. One still waiting for the API server's headers is named in an error line (see watch.py)."""
        for watch in self.watches:
            watch.request_stop()
        deadline = time.monotonic() + timeout
        alive = [watch.thread_name for watch in self.watches if not watch.join(deadline)]
        if alive:
            log.error("Kubernetes registry: %s still running %.0fs after stop, waiting for the API server's answer; "
                      "it ends within that request's read timeout (%.0fs for a list) and, a daemon thread, with the "
                      "process", ", ".join(alive), timeout, LIST_READ_TIMEOUT_SECONDS)
        return not alive

    def unreachable(self) -> str:
        """Empty while every watch answers; else what the agent serves meanwhile (for /readyz and logs)."""
        failing = [(w.stats.failing_since, w) for w in self.watches if w.stats.failing_since]
        if not failing:
            return ""
        since, watch = min(failing, key=lambda pair: pair[0])
        registry = self.last.registry if self.last is not None else None
        state = (f"{len(registry.workloads)} pods, {len(registry.nodes)} nodes" if registry is not None
                 else "nothing yet")
        return (f"registry: the Kubernetes API has not answered since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))} ({watch.kind}: "
                f"{watch.stats.last_error}); serving the last known state ({state}) and retrying with backoff")

    def _changed(self) -> None:   # watcher threads
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    def build(self) -> BuildResult:
        pods = self.pods.snapshot()
        live = {(p.get("metadata") or {}).get("uid") for p in pods}
        self._cgroups = {uid: path for uid, path in self._cgroups.items() if uid in live}
        return build_registry(self.trust_domain, self.node_name, pods, self.nodes.snapshot(), self._cgroup_of,
                              self.services.snapshot() if self.services else (),
                              self.endpoint_slices.snapshot() if self.endpoint_slices else ())

    def _cgroup_of(self, pod: Mapping[str, Any]) -> str | None:
        uid = (pod.get("metadata") or {}).get("uid") or ""
        if uid not in self._cgroups:
            found = find_pod_cgroup(self.cgroup_root, uid, (pod.get("status") or {}).get("qosClass") or "")
            if found is None:
                return None
            self._cgroups[uid] = found
        return self._cgroups[uid]

    async def first_snapshot(self, timeout: float = FIRST_SYNC_TIMEOUT_SECONDS) -> Registry:
        """Wait for every first list; the registry they make (raises TcpmeshError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for watch in self.watches:
            while not watch.synced.is_set():
                if time.monotonic() > deadline:
                    raise TcpmeshError(f"no list of {watch.kind} from the Kubernetes API within {timeout:.0f}s: "
                                       f"{watch.stats.last_error or 'no answer'}")
                await asyncio.sleep(0.05)
        result = await asyncio.get_running_loop().run_in_executor(None, self.build)
        self._report(result)
        self.last = result
        return result.registry

    async def run(self) -> None:
        """Publish a snapshot after every change (coalesced), and look again for missing pod cgroups."""
        assert self._event is not None
        loop = asyncio.get_running_loop()
        refused = False
        while True:
            retry = None
            if refused:
                retry = self.refused_retry
            elif self.last is not None and self.last.missing_cgroups:
                retry = CGROUP_RETRY_SECONDS
            try:
                await asyncio.wait_for(self._event.wait(), timeout=retry)
            except asyncio.TimeoutError:
                pass
            self._event.clear()
            result = await loop.run_in_executor(None, self.build)
            if self.last is None or refused or _differs(self.last.registry, result.registry):
                self._report(result)
                try:
                    # None: refused whole (it conflicts with a run-time workload); tried again until it applies
                    refused = self.on_snapshot(result.registry) is None
                    self.published += 0 if refused else 1
                except Exception:  # noqa: BLE001 — a task root: the next change tries again
                    log.exception("applying the Kubernetes snapshot failed")
                    refused = True
            if not refused:
                self.last = result
            await asyncio.sleep(self.min_interval)

    def _report(self, result: BuildResult) -> None:
        registry = result.registry
        log.info("kubernetes: %d nodes, %d pods in the mesh (%d on %s), %d left out, %d services%s",
                 len(registry.nodes), len(registry.workloads), len(registry.local(self.node_name)), self.node_name,
                 len(result.skipped), len(registry.services),
                 f"; no cgroup yet for {', '.join(result.missing_cgroups)}" if result.missing_cgroups else "")
        for key, why in result.skipped:
            log.debug("kubernetes: pod %s left out: %s", key, why)
        ipv6_only = {key: why for key, why in result.skipped if why.startswith(IPV6_ONLY)}
        for key in sorted(set(ipv6_only) - self._warned):  # loud: outside the mesh, its traffic is not meshed
            log.warning("kubernetes: pod %s left out of the mesh: %s", key, ipv6_only[key])
        self._warned = frozenset(ipv6_only)
        for key, why in result.services_skipped:
            log.debug("kubernetes: service %s: %s", key, why)


def _differs(a: Registry, b: Registry) -> bool:
    return (a.workloads != b.workloads or dict(a.nodes) != dict(b.nodes) or a.services != b.services
            or a.trust_domain != b.trust_domain)


async def start_kubernetes_source(config: Any, workloads: Any, api_client: Any = None,
                                  **options: Any) -> KubernetesSource:
    """Build the source from the agent's config, wait for the first lists and load that snapshot into
    the WorkloadController (before the agent reports ready); the caller runs ``source.run()``."""
    source = KubernetesSource(api_client or make_api_client(config.registry.kubeconfig), config.node.name,
                              config.trust_domain, config.capture.cgroup_root, workloads.replace_base, **options)
    source.start()
    try:
        registry = await source.first_snapshot()
        if config.node.name not in registry.nodes:
            raise ConfigError("node.name", config.node.name, "is not a node of the cluster, or it has no InternalIP "
                              f"(nodes: {', '.join(sorted(registry.nodes)) or 'none'})",
                              "the DaemonSet sets it from spec.nodeName (TCPMESH_NODE_NAME)")
        workloads.load_base(registry, "kubernetes")
    except BaseException:
        source.stop()
        raise
    return source
