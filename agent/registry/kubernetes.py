"""The Kubernetes registry source (``registry.source: kubernetes``): pods and nodes from the API server.

Two list + watch loops (pods in every namespace, nodes) keep a local copy of the objects, the way
client-go's reflector does: list (in pages), then watch from the list's resourceVersion with
bookmarks; a watch that ends is re-opened from the last resourceVersion seen; ``410 Gone`` (as an
HTTP status or an ERROR event) means that version is compacted away, so the loop lists again and
replaces its copy whole; any other failure (refused, reset, a dropped stream, a 5xx) waits with a
jittered exponential backoff and resumes. Each loop runs on its own thread, with the official
``kubernetes`` client (installed by the ``kubernetes`` extra), and reads raw JSON, not models.

From the two copies ``build_registry`` (pure) makes one ``Registry``:
- every pod with an IPv4 ``status.podIP`` that is not ``hostNetwork`` and not finished becomes a
  workload: name, namespace, ``spec.serviceAccountName`` (identity ``ns/<ns>/sa/<sa>``), IP, and node
  ``spec.nodeName`` — a resolvable destination whose tunnel address is its node's ``InternalIP``;
- pods of this node (``spec.nodeName == node.name``) get their pod cgroup, found from the pod UID
  under the cgroup mount in either kubelet layout (``find_pod_cgroup``), so they are captured.

``KubernetesSource`` hands each changed snapshot to the agent's WorkloadController
(``replace_base``), which applies it all or nothing. Tests: a local HTTP server speaking the
list/watch protocol (tests/integration/test_kubernetes_source.py) — the only stand-in in the suite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from agent.errors import ConfigError, TcpmeshError
from agent.identity.spiffe import SpiffeIdError, validate_namespace, validate_service_account
from agent.registry.model import Node, Registry, Workload, is_ipv4

log = logging.getLogger("tcpmesh.registry.kubernetes")

WATCH_TIMEOUT_SECONDS = 300          # server side; re-opened at once when it ends (client-go: 5-10 min)
CONNECT_TIMEOUT_SECONDS = 10.0
READ_SLACK_SECONDS = 30.0            # client read timeout = watch timeout + this (a silent, dead stream)
LIST_PAGE_SIZE = 500
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
BACKOFF_JITTER = 0.2
FIRST_SYNC_TIMEOUT_SECONDS = 60.0
MIN_PUBLISH_INTERVAL_SECONDS = 0.2   # bursts of events (a rollout) become one snapshot
CGROUP_RETRY_SECONDS = 1.0           # a local pod whose cgroup is not there yet is looked up again
REFUSED_RETRY_SECONDS = 10.0         # a snapshot the controller refused is offered again (a conflict may clear)
FINISHED_PHASES = ("Succeeded", "Failed")
HTTP_GONE = 410


# ------------------------------------------------------------------------------------- pure part

def node_internal_ip(node: Mapping[str, Any]) -> str | None:
    """The node's first IPv4 ``InternalIP`` (where its agent's :15008 is reached), or None."""
    for address in (node.get("status") or {}).get("addresses") or ():
        if address.get("type") == "InternalIP" and is_ipv4(address.get("address", "")):
            return address["address"]
    return None


QOS_CLASSES = ("guaranteed", "burstable", "besteffort")


def pod_cgroup_candidates(uid: str, qos_class: str = "") -> list[str]:
    """Where the kubelet puts a pod's cgroup, relative to the cgroup v2 mount, most likely first.

    systemd driver: ``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - → _>.slice``
    (Guaranteed pods sit directly in kubepods.slice); cgroupfs driver: ``kubepods/<qos>/pod<uid>``
    (Guaranteed: ``kubepods/pod<uid>``). The pod's own QoS class comes first, then the others.
    """
    underscored = uid.replace("-", "_")
    qos = (qos_class or "").lower()
    order = [qos] + [q for q in QOS_CLASSES if q != qos] if qos in QOS_CLASSES else list(QOS_CLASSES)
    paths = []
    for q in order:
        if q == "guaranteed":
            paths += [f"kubepods.slice/kubepods-pod{underscored}.slice", f"kubepods/pod{uid}"]
        else:
            paths += [f"kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{underscored}.slice",
                      f"kubepods/{q}/pod{uid}"]
    return paths


def find_pod_cgroup(cgroup_root: str, uid: str, qos_class: str = "", *, search_depth: int = 4,
                    isdir: Callable[[str], bool] = os.path.isdir) -> str | None:
    """The pod cgroup directory of pod ``uid``: the two standard layouts first, then a bounded search
    of ``kubepods*`` directories (kubelets with their own --cgroup-root, kind, nested runtimes)."""
    if not uid:
        return None
    for relative in pod_cgroup_candidates(uid, qos_class):
        path = os.path.join(cgroup_root, relative)
        if isdir(path):
            return path
    names = (f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice")
    return _search(cgroup_root, names, search_depth)


def _search(directory: str, names: tuple[str, ...], depth: int) -> str | None:
    if depth <= 0:
        return None
    try:
        entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    for entry in entries:
        if entry.name == names[0] or entry.name.endswith(names[1]):
            return entry.path
    for entry in entries:
        if "kubepods" in entry.name or "kubelet" in entry.name:
            found = _search(entry.path, names, depth - 1)
            if found:
                return found
    return None


@dataclass(frozen=True)
class BuildResult:
    registry: Registry
    skipped: tuple[tuple[str, str], ...] = ()       # (namespace/name, why) of pods left out
    missing_cgroups: tuple[str, ...] = ()            # local pods whose cgroup is not there yet


def build_registry(trust_domain: str, local_node: str, pods: Iterable[Mapping[str, Any]],
                   nodes: Iterable[Mapping[str, Any]],
                   cgroup_of: Callable[[Mapping[str, Any]], str | None]) -> BuildResult:
    """One registry snapshot from Pod and Node objects (dicts as the API returns them)."""
    node_list = []
    for node in nodes:
        name = (node.get("metadata") or {}).get("name", "")
        address = node_internal_ip(node)
        if name and address:
            node_list.append(Node(name, address))
    known = {n.name for n in node_list}
    chosen: dict[str, tuple[Workload, str]] = {}   # ip → (workload, creationTimestamp)
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        key = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
        why = _skip_reason(meta, spec, status, known)
        if why:
            skipped.append((key, why))
            continue
        cgroup = None
        if spec["nodeName"] == local_node:
            cgroup = cgroup_of(pod)
            if cgroup is None:
                missing.append(key)
        workload = Workload(meta["name"], meta["namespace"], spec.get("serviceAccountName") or "default",
                            status["podIP"], spec["nodeName"], cgroup, trust_domain)
        created = meta.get("creationTimestamp") or ""
        other = chosen.get(workload.ip)
        if other is not None:
            older, newer = sorted([other, (workload, created)], key=lambda wc: (wc[1], wc[0].key))
            skipped.append((older[0].key, f"IP {workload.ip} is also the IP of the newer pod {newer[0].key}"))
            chosen[workload.ip] = newer
        else:
            chosen[workload.ip] = (workload, created)
    workloads = sorted((w for w, _ in chosen.values()), key=lambda w: w.key)
    registry = Registry.build(trust_domain, sorted(node_list, key=lambda n: n.name), workloads)
    return BuildResult(registry, tuple(skipped), tuple(missing))


def _skip_reason(meta: Mapping[str, Any], spec: Mapping[str, Any], status: Mapping[str, Any],
                 known_nodes: set[str]) -> str:
    if not meta.get("name") or not meta.get("namespace"):
        return "no name or namespace"
    if spec.get("hostNetwork"):
        return "hostNetwork: it shares its node's IP"
    if status.get("phase") in FINISHED_PHASES:
        return f"phase {status['phase']}"
    ip = status.get("podIP") or ""
    if not ip:
        return "no pod IP yet"
    if not is_ipv4(ip):
        return f"pod IP {ip} is not IPv4"
    node = spec.get("nodeName") or ""
    if not node:
        return "not scheduled"
    if node not in known_nodes:
        return f"node {node} is unknown or has no InternalIP"
    try:
        validate_namespace(meta["namespace"])
        validate_service_account(spec.get("serviceAccountName") or "default")
    except SpiffeIdError as exc:
        return str(exc)
    return ""


class Backoff:
    """Jittered exponential backoff: initial, ×2 per failure, capped; ``reset()`` after a success."""

    def __init__(self, initial: float = BACKOFF_INITIAL_SECONDS, maximum: float = BACKOFF_MAX_SECONDS,
                 jitter: float = BACKOFF_JITTER, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return base * (1 + self._rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.failures = 0


# ------------------------------------------------------------------------------ list + watch loop

class Gone(Exception):
    """The resourceVersion we asked for is too old (HTTP 410 or an ERROR event with code 410)."""


@dataclass
class WatchStats:
    lists: int = 0            # complete lists (the first one and every re-list)
    relists_gone: int = 0     # re-lists because of 410 Gone
    watches: int = 0          # watch requests opened
    events: int = 0           # ADDED / MODIFIED / DELETED applied
    errors: int = 0           # failures followed by a backoff
    last_error: str = ""
    backoff_delays: list[float] = field(default_factory=list)


class WatchLoop:
    """List + watch one resource on a thread; keeps ``objects`` (key → dict) current."""

    def __init__(self, kind: str, list_call: Callable[..., Any], key: Callable[[Mapping[str, Any]], str],
                 on_change: Callable[[], None], *, watch_timeout: int = WATCH_TIMEOUT_SECONDS,
                 backoff: Backoff | None = None, page_size: int = LIST_PAGE_SIZE) -> None:
        self.kind = kind
        self._list_call = list_call
        self._key = key
        self._on_change = on_change
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.objects: dict[str, dict] = {}   # replaced whole on a list, edited by events; read under lock
        self.lock = threading.Lock()
        self.synced = threading.Event()      # the first list is in
        self.resource_version = ""
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"k8s-watch-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            try:
                # wakes the read blocked on the stream; close() from here would wait for that read's lock
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.objects.values())

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    self.backoff.reset()
                self._watch()
                self.backoff.reset()           # the stream ended normally: re-open from resource_version
            except Gone as exc:
                self.stats.relists_gone += 1
                log.info("%s watch: %s; listing again", self.kind, exc)
                need_list = True
            except Exception as exc:  # noqa: BLE001 — a task root: every failure is logged, counted, retried
                if self._stop.is_set():
                    break
                self.stats.errors += 1
                self.stats.last_error = _describe(exc)
                delay = self.backoff.next()
                self.stats.backoff_delays.append(delay)
                log.warning("%s %s failed: %s; retrying in %.1fs", self.kind, "list" if need_list else "watch",
                            self.stats.last_error, delay)
                self._stop.wait(delay)

    def _list(self) -> None:
        objects: dict[str, dict] = {}
        token = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False,
                                      "_request_timeout": (CONNECT_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS * 6)}
            if token:
                kwargs["_continue"] = token
            doc = _read_json(self._call(**kwargs))
            for item in doc.get("items") or ():
                objects[self._key(item)] = item
            metadata = doc.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                break
        with self.lock:
            self.objects = objects
        self.resource_version = metadata.get("resourceVersion") or ""
        self.stats.lists += 1
        self.synced.set()
        self._on_change()

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        self.stats.watches += 1
        response = self._call(watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout, _preload_content=False,
                              _request_timeout=(CONNECT_TIMEOUT_SECONDS, self.watch_timeout + READ_SLACK_SECONDS))
        self._response = response
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return
                if line.strip():
                    self._apply(json.loads(line))
                    self.backoff.reset()           # the stream works (a bare connect does not count)
        finally:
            self._response = None
            response.close()
            response.release_conn()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == HTTP_GONE:
                raise Gone(obj.get("message") or "resourceVersion too old")
            raise TcpmeshError(f"watch ERROR event: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            key = self._key(obj)
            with self.lock:
                if kind == "DELETED":
                    self.objects.pop(key, None)
                else:
                    self.objects[key] = obj
            self.stats.events += 1
            self._on_change()
        elif kind != "BOOKMARK":
            log.debug("%s watch: ignoring event type %r", self.kind, kind)
        if version:
            self.resource_version = version

    def _call(self, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._list_call(**kwargs)
        except ApiException as exc:
            if exc.status == HTTP_GONE:
                raise Gone(f"HTTP 410: {exc.reason}") from exc
            raise
        return response


def _read_json(response: Any) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _describe(exc: BaseException) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        hint = " (RBAC: the service account needs get/list/watch on pods and nodes)" if exc.status == 403 else ""
        return f"HTTP {exc.status} {exc.reason}{hint}"
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------- the source

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
    """Pods and nodes → registry snapshots for the WorkloadController (``on_snapshot``)."""

    def __init__(self, api_client: Any, node_name: str, trust_domain: str, cgroup_root: str,
                 on_snapshot: Callable[[Registry], Any], *, watch_timeout: int = WATCH_TIMEOUT_SECONDS,
                 backoff_factory: Callable[[], Backoff] = Backoff,
                 min_interval: float = MIN_PUBLISH_INTERVAL_SECONDS,
                 refused_retry: float = REFUSED_RETRY_SECONDS) -> None:
        from kubernetes import client

        self.node_name = node_name
        self.trust_domain = trust_domain
        self.cgroup_root = cgroup_root
        self.on_snapshot = on_snapshot
        self.min_interval = min_interval
        self.refused_retry = refused_retry
        core = client.CoreV1Api(api_client)
        self.pods = WatchLoop("pods", core.list_pod_for_all_namespaces, lambda o: o["metadata"]["uid"],
                              self._changed, watch_timeout=watch_timeout, backoff=backoff_factory())
        self.nodes = WatchLoop("nodes", core.list_node, lambda o: o["metadata"]["name"],
                               self._changed, watch_timeout=watch_timeout, backoff=backoff_factory())
        self.published = 0
        self.last: BuildResult | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._cgroups: dict[str, str] = {}   # pod uid → cgroup dir (found once, kept while the pod lives)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.pods.start()
        self.nodes.start()

    def stop(self) -> None:
        self.pods.stop()
        self.nodes.stop()

    def _changed(self) -> None:   # watcher threads
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    def build(self) -> BuildResult:
        pods = self.pods.snapshot()
        live = {(p.get("metadata") or {}).get("uid") for p in pods}
        self._cgroups = {uid: path for uid, path in self._cgroups.items() if uid in live}
        return build_registry(self.trust_domain, self.node_name, pods, self.nodes.snapshot(), self._cgroup_of)

    def _cgroup_of(self, pod: Mapping[str, Any]) -> str | None:
        uid = (pod.get("metadata") or {}).get("uid") or ""
        if uid not in self._cgroups:
            found = find_pod_cgroup(self.cgroup_root, uid, (pod.get("status") or {}).get("qosClass") or "")
            if found is None:
                return None
            self._cgroups[uid] = found
        return self._cgroups[uid]

    async def first_snapshot(self, timeout: float = FIRST_SYNC_TIMEOUT_SECONDS) -> Registry:
        """Wait for both first lists; the registry they make (raises TcpmeshError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for watch in (self.pods, self.nodes):
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
        log.info("kubernetes: %d nodes, %d pods in the mesh (%d on %s), %d left out%s", len(registry.nodes),
                 len(registry.workloads), len(registry.local(self.node_name)), self.node_name, len(result.skipped),
                 f"; no cgroup yet for {', '.join(result.missing_cgroups)}" if result.missing_cgroups else "")
        for key, why in result.skipped:
            log.debug("kubernetes: pod %s left out: %s", key, why)


def _differs(a: Registry, b: Registry) -> bool:
    return a.workloads != b.workloads or dict(a.nodes) != dict(b.nodes) or a.trust_domain != b.trust_domain


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


def own_pod_cgroup(argv: list[str]) -> int:
    """``python -m agent.registry.kubernetes pod-cgroup CGROUP_ROOT POD_UID``: print the pod's cgroup.

    The DaemonSet's container runs in a private cgroup namespace, so /proc/self/cgroup says "/";
    it asks this for its own pod's cgroup on the host's mount and passes it as
    TCPMESH_CAPTURE_PROXY_CGROUP (where the getsockopt hook goes; docs/install-kubernetes.md).
    """
    if len(argv) != 3 or argv[0] != "pod-cgroup":
        print("usage: python -m agent.registry.kubernetes pod-cgroup CGROUP_ROOT POD_UID", file=sys.stderr)
        return 2
    found = find_pod_cgroup(argv[1], argv[2])
    if found is None:
        print(f"no cgroup of pod {argv[2]} below {argv[1]} (kubepods.slice/… or kubepods/…)", file=sys.stderr)
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(own_pod_cgroup(sys.argv[1:]))
