"""The composition root: the one place where the agent is built from its config and wired together.

``Agent.run()`` loads the registry, the CA and the capture programs, starts the proxies and the
admin endpoint, attaches capture to the local pods, then waits for SIGTERM/SIGINT: it stops
accepting, drains open connections and returns. Capture stays attached (ebpf-connect: pinned), so
pods fail closed until the next start adopts it; `tcpmesh cleanup` removes it. Nothing is global.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent.capture.interface import Capture
from agent.capture.modes import build_capture
from agent.capture.source_return import SourceReturn, WithSourceReturn
from agent.config import CGROUP_ROOT_AUTO, Config, admin_allowed_sources, resolve_cgroup_root
from agent.control.admin_socket import AdminSocket
from agent.control.config_changes import restart_hint
from agent.control.config_watch import ConfigWatch
from agent.control.node_addresses import NodeAddressFollower
from agent.control.status import node_status
from agent.control.workloads import WorkloadController
from agent.errors import EnvironmentProblem, KernelError, TcpmeshError
from agent.service.heap import freeze_startup_objects, heap_trimmer, trim_heap_forever
from agent.host import checks
from agent.identity.errors import CaError
from agent.identity.svid_rotator import IdentityRotator, rotator_from_config
from agent.identity.store import IdentityStore
from agent.identity.tls import require_verified_chain
from agent.mounts import host_cgroup2
from agent.policy.explain import explain, request_for
from agent.policy.model import MtlsMode
from agent.policy.source import PolicySource
from agent.proxy import hotpath
from agent.proxy.budget import budget_from_config
from agent.proxy.deadlines import reset_idle, sweep_idle_relays
from agent.proxy.heap import keep_heap_for_relaying
from agent.proxy.inbound import InboundProxy
from agent.proxy.kernel_leg import KernelTls
from agent.proxy.kernel_tls_probe import kernel_tls_for
from agent.proxy.limits import ConnectionLimits, fitting_cap, handshake_limits, raise_open_files_limit
from agent.proxy.local import SameNodePath
from agent.proxy.outbound import OutboundProxy
from agent.proxy.server import ProxyContext
from agent.proxy.session import BufferGate, wake_ended_forever
from agent.proxy.upstream import transparent_allowed
from agent.registry.model import Registry, Workload
from agent.registry.static_file import load_registry_for_node
from agent.service import sdnotify
from agent.telemetry.admin import AdminServer
from agent.telemetry.capture_events import CaptureEventsCollector
from agent.telemetry.plaintext import PlaintextCollector
from agent.audit.writer import AccessLog, access_log_from_config
from agent.connection.flow import UNKNOWN
from agent.telemetry.cgroups import CgroupNames
from agent.telemetry.egress import EgressReport
from agent.telemetry.refusals import Refusal, RefusalReport, read_forever as read_refusals_forever
from agent.telemetry.tcpstats import KernelTcpStats, tcp_stats_from_config
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics
from agent.telemetry.runtime import RuntimeStats

if TYPE_CHECKING:
    from agent.registry.kubernetes.source import KubernetesSource

log = logging.getLogger("tcpmesh.agent")
RUNTIME_WORKLOADS_FILE = "runtime-workloads.json"
FIRST_SVIDS_POLL_SECONDS = 0.05   # how often the start looks whether the first SVIDs are in (a set lookup)
STOP_TASKS_SECONDS = 5.0  # at stop, for the cancelled control-plane tasks (identity rotator, watches) to end
FIRST_SVIDS_EXTEND_SECONDS = 60.0  # not ready for want of the issuer: systemd's start timeout pushed this far ahead
FIRST_SVIDS_EXTEND_EVERY_SECONDS = 2.0  # this often: a `systemctl daemon-reload` re-arms a starting unit's deadline
# from TimeoutStartSec (counted from the start) and forgets every extension, so the next one must come soon
IP_TRANSPARENT = 19


class Agent:
    def __init__(self, config: Config, config_path: str = "") -> None:
        if config.capture.cgroup_root == CGROUP_ROOT_AUTO:  # load_config resolved it; a Config built in code may not
            config = resolve_cgroup_root(config, host_cgroup2())
        self.config = config
        self.config_path = config_path  # re-read by identity.reload (`tcpmesh identity reload`) and the watch
        self._identity_switch = asyncio.Lock()
        self._previous_handlers: dict[int, Any] = {}   # what SIGTERM, SIGINT, SIGHUP did before run() took them
        self._signal_reloads: set[asyncio.Task] = set()
        self._sighup_held = False  # a SIGHUP came during the start (_hold_sighup): reload once started
        # config_file.watch: reloads when the file changes; its first signature is the file the start read
        self._config_watch = ConfigWatch(config_path, enabled=lambda: self.config.config_file.watch,
                                         poll_seconds=lambda: self.config.config_file.poll_seconds,
                                         on_change=self._config_file_changed) if config_path else None
        self._config_reload: dict = {"last_reload": None, "refused": None, "restart_needed": []}
        self.prometheus = CollectorRegistry()
        self.metrics = Metrics(self.prometheus)
        self.cgroups = CgroupNames()  # cgroup id → path, for the access log's `cgroup`
        self.access_log: AccessLog | None = access_log_from_config(config, self.metrics, enrich=self.cgroups.enrich)
        self.flows = FlowTable(access_log=self.access_log, log_open=config.access_log.log_open)
        self.tcp_stats: KernelTcpStats | None = None
        self.refusals: RefusalReport | None = None  # ebpf-tc, iptables: connections their node table reset
        self.capture: Capture | None = None
        self.source_return: WithSourceReturn | None = None  # proxy.source_address pod/auto (wraps capture)
        self.workloads: WorkloadController | None = None
        self.policy: PolicySource | None = None
        self.kubernetes: KubernetesSource | None = None  # registry.source: kubernetes (its health: /readyz detail)
        self.ctx: ProxyContext | None = None
        self.kernel_tls = KernelTls.off("not started")  # proxy.kernel_tls, decided at start (_run)
        self._local: dict[str, Workload] = {}  # local workloads as last applied (removed ones: connections cut)
        self._inbound_modes: dict[str, bool] = {}  # workload key -> STRICT, as last written to the kernel
        self.admin: AdminServer | None = None
        self.rotator: IdentityRotator | None = None  # owns the IdentityStore; renews SVIDs, follows the node CA
        self.ready = False
        self.not_ready_reason = "starting"  # /readyz and systemd STATUS= say this while not ready
        self._policy_in_force = asyncio.Event()  # the start gate: no listener opens before a policy set loads
        self._stop = asyncio.Event()

    def _connection_limits(self) -> dict[str, ConnectionLimits]:
        """One set of caps per side (agent.proxy.limits); refusals are counted by side and cap."""
        proxy = self.config.proxy
        open_files, _ = raise_open_files_limit()
        total = fitting_cap(proxy.max_connections, open_files)
        per_identity = min(proxy.max_connections_per_identity or total, total)
        log.info("open-files limit %d; connection caps per side: %d, per source identity: %d", open_files, total,
                 per_identity)
        hit = lambda reporter, limit: self.metrics.connection_limit_hits.labels(reporter, limit).inc()  # noqa: E731
        return {reporter: ConnectionLimits(reporter, total, per_identity, hit) for reporter in ("source", "destination")}

    def _handshake_limits(self) -> ConnectionLimits:
        proxy = self.config.proxy
        hit = lambda reporter, limit: self.metrics.handshakes_refused.labels(limit).inc()  # noqa: E731
        return handshake_limits(proxy.max_handshakes, proxy.max_handshakes_per_source, hit)

    def _buffer_gate(self) -> BufferGate:
        """The node-wide budget of buffered bytes (agent.proxy.budget) and its hands on the tunnels."""
        proxy = self.config.proxy
        budget, origin = budget_from_config(proxy.buffer_budget_bytes, proxy.buffer_identity_shares)
        log.info("buffer budget %d bytes (%s): %d identities sure of %d bytes each, a pool of %d", budget.total,
                 origin, budget.shares, budget.share, budget.pool)
        return BufferGate(budget)

    def _snapshot_or_none(self) -> Registry | None:
        return self.workloads.snapshot if self.workloads is not None else None

    def registry(self) -> Registry:
        """The current registry snapshot (the data path's view)."""
        assert self.workloads is not None and self.workloads.snapshot is not None
        return self.workloads.snapshot

    # -- building -----------------------------------------------------------------------------
    def _build_identities(self) -> IdentityStore:
        if self.config.identity.mode == "issuer":
            from agent.issuer.node_side import issuer_rotator

            self.rotator = issuer_rotator(self.config, self.metrics)
        else:
            self.rotator = rotator_from_config(self.config, self.metrics)
        return self.rotator.store

    def _certs_report(self) -> dict:
        """/debug/certs (admin thread): the rotator's report, naming the local workloads of each identity."""
        names: dict = {}
        if self.workloads is not None and self.workloads.snapshot is not None:
            for workload in self.registry().local(self.config.node.name):
                names.setdefault(workload.spiffe_id, []).append(workload.name)
        return self.rotator.report(names)

    def status(self) -> dict:
        """`tcpmesh status` for this node (agent.control.status): the admin socket's ``status``, /debug/status."""
        policy = self.policy
        refused = policy.refused if policy is not None else None
        policy_doc = {"dir": self.config.policy.dir, "in_force": bool(policy and policy.in_force),
                      "loaded_at": policy.loaded_at if policy else None,
                      "authorization": len(policy.policies.authorization) if policy else 0,
                      "peer_authentication": len(policy.policies.peer_authentication) if policy else 0,
                      "files": len(policy.policies.files) if policy else 0,
                      "default_action": self.config.policy.default_action,
                      "refused": refused.to_json() if refused is not None else None}
        identities = self.rotator.report().get("identities", []) if self.rotator is not None else []
        return node_status(node=self.config.node.name, now=time.time(), ready=self.ready,
                           not_ready_reason=self.not_ready_reason,
                           capture_mode=self.capture.name if self.capture is not None else "none (stopped)",
                           workloads=self.workloads.describe() if self.workloads is not None else [],
                           identities=identities, policy=policy_doc, registry=self._registry_status(),
                           issuer=self._issuer_status(), config=self._config_status(),
                           tunnel_tls=self.kernel_tls.describe(),
                           refused=list(self.refusals.recent.values()) if self.refusals is not None else ())

    def _config_status(self) -> dict:
        """The config file's reloads, for `tcpmesh status`: empty when the agent runs without a file."""
        if not self.config_path:
            return {}
        return {"file": self.config_path, "watch": self.config.config_file.watch,
                "restart_hint": restart_hint(self.config.registry.source), **self._config_reload}

    def _issuer_status(self) -> dict | None:
        """identity.mode issuer: what the node side knows of the issuer (agent.issuer.node_side.IssuerState);
        None in node_ca mode ("not configured")."""
        state = getattr(getattr(self.rotator, "_source", None), "state", None)
        if self.config.identity.mode != "issuer" or state is None:
            return None
        return {"configured": True, "address": ", ".join(state.addresses),
                **state.report(datetime.datetime.now(datetime.timezone.utc)), "awaiting": self.rotator.awaiting()}

    async def _reload_identity(self, request: dict) -> dict:
        """The admin socket's identity.reload (`tcpmesh identity reload`): apply the config file again, no
        restart (agent.control.identity_switch); one at a time — a second is refused while one runs."""
        from agent.control.identity_switch import IdentityReloadRefused

        if self._identity_switch.locked():
            raise IdentityReloadRefused("an identity.reload is already in progress on this agent; wait for its answer")
        return await self._reload_config("command", request.get("unit_environment"))

    async def _reload_on_signal(self) -> None:
        """SIGHUP (``kill -HUP``, ``systemctl kill -s HUP``): the same reload as `tcpmesh identity reload`, reported
        the same way (log, `tcpmesh status`, metrics) — before, SIGHUP's default action ended the agent."""
        from agent.control.identity_switch import IdentityReloadRefused

        if self._identity_switch.locked():
            log.warning("SIGHUP: a config reload is already in progress; this one is not run (send it again once "
                        "`tcpmesh status` shows the last reload)")
            return
        try:
            await self._reload_config("signal")
        except IdentityReloadRefused:
            pass  # _reload_config logged, counted and recorded it

    async def _config_file_changed(self) -> bool:
        """config_file.watch: the file changed (a kubelet ConfigMap update): the same reload as the command; a
        refusal is logged, counted and shown by `tcpmesh status` — the last good config keeps running. True:
        worth trying the same file again (its identity switch failed, e.g. the issuer does not answer yet)."""
        from agent.control.identity_switch import IdentityReloadRefused

        try:
            await self._reload_config("watch")
        except IdentityReloadRefused as exc:
            return exc.retryable  # _reload_config reported it
        return False

    async def _reload_config(self, trigger: str, unit_environment: Any = None) -> dict:
        from agent.control.identity_switch import IdentityReloadRefused, reload_identity

        async with self._identity_switch:
            if self._config_watch is not None:
                self._config_watch.remember()   # this version of the file is read now: no second reload for it
            try:
                self.config, answer = await reload_identity(self.config_path, self.config, self.rotator, self.metrics,
                                                            unit_environment)
            except IdentityReloadRefused as exc:
                log.error("config reload (%s) refused: %s. `tcpmesh status` shows it; fix the file or the variable "
                          "it names and reload again (a fixed file applies by itself with config_file.watch on)",
                          trigger, exc)
                self._config_reload["refused"] = {"at": time.time(), "trigger": trigger, "error": str(exc)}
                self._config_reload["last_reload"] = {"at": time.time(), "trigger": trigger, "result": "refused"}
                self.metrics.config_reloads.labels(trigger, "refused").inc()
                self.metrics.config_refused.set(1)
                raise
        result = "applied" if answer["switched"] or answer["applied"] else "unchanged"
        (log.warning if result == "applied" or answer["restart_needed"] else log.info)(
            "config reload (%s): %s", trigger, answer["message"])  # the message names the file
        self._config_reload.update(refused=None, restart_needed=answer["restart_needed"],
                                   last_reload={"at": time.time(), "trigger": trigger, "result": result})
        self.metrics.config_reloads.labels(trigger, result).inc()
        self.metrics.config_refused.set(0)
        self.metrics.config_restart_needed.set(len(answer["restart_needed"]))
        return answer

    def _policy_explain(self, request: dict) -> dict:
        """The admin socket's policy.explain: the set in force (never the files on disk), and a refused change."""
        try:
            port = int(request.get("port"))
        except (TypeError, ValueError):
            raise TcpmeshError(f"policy.explain: port must be a whole number, got {request.get('port')!r}") from None
        wanted = request_for(str(request.get("from") or ""), str(request.get("to") or ""), port)
        destination = f"{wanted.destination_namespace}/{wanted.destination_workload}"
        self._require_workload("--to", destination)
        policy = self.policy
        doc = {"node": self.config.node.name, "dir": self.config.policy.dir, "in_force": policy.in_force,
               "refused": policy.refused.to_json() if policy.refused is not None else None,
               "source": wanted.source_principal or "plaintext", "destination": destination, "port": port,
               "objects": len(policy.policies.authorization) + len(policy.policies.peer_authentication)}
        if policy.in_force:
            doc["explanation"] = explain(policy.policies, wanted, default_allow=policy.default_allow,
                                         root_namespace=policy.root_namespace)
        return doc

    def _require_workload(self, option: str, wanted: str) -> None:
        """A TcpmeshError when ``wanted`` (NAME or NAMESPACE/NAME) is no workload of the registry."""
        workloads = self.registry().workloads
        if any(wanted in (w.key, w.name) for w in workloads):
            return
        namespace = wanted.partition("/")[0] if "/" in wanted else None
        listed = sorted(w.key for w in workloads if namespace is None or w.namespace == namespace)
        where = f"workloads of namespace {namespace}" if namespace else "its workloads"
        raise TcpmeshError(f"{option} {wanted}: no such workload in the registry of node {self.config.node.name} "
                           f"({where}: {', '.join(listed) or 'none'}); check the name with `tcpmesh workload list`")

    def _registry_status(self) -> dict:
        workloads = self.workloads
        doc = {"source": self.config.registry.source, "errors": workloads.file_errors if workloads else 0,
               "last_error": workloads.last_error if workloads else "", "healthy": not (workloads and workloads.last_error)}
        if self.config.registry.source == "file":
            doc["file"] = self.config.registry.file
        if self.kubernetes is not None:
            watches = {w.kind: {"synced": w.synced.is_set(), "errors": w.stats.errors, "last_error": w.stats.last_error}
                       for w in (self.kubernetes.pods, self.kubernetes.nodes)}
            doc["watches"] = watches
            unreachable = self.kubernetes.unreachable()
            doc["healthy"] = doc["healthy"] and not unreachable and all(w["synced"] for w in watches.values())
            doc["last_error"] = unreachable or doc["last_error"]
        return doc

    def _warning(self) -> str:
        """Said after ok/ready on /healthz and /readyz: what works but needs the operator (a refused change)."""
        refused = self.policy.refused if self.policy is not None and self.policy.in_force else None
        return f"policy change refused, the previous set stays in force: {refused.error}" if refused else ""

    def _proxy_cgroup(self) -> str:
        """The agent's own cgroup v2 directory: capture.proxy_cgroup, else the one this process runs in."""
        return self.config.capture.proxy_cgroup or checks.own_cgroup_path(self.config.capture.cgroup_root)

    def _build_capture(self) -> Capture:
        """The configured capture mode, ``auto`` resolved with the host probes; the host checked first."""
        mode = self.config.capture.mode
        if mode == "auto":
            from agent.host.doctor import choose_capture_mode

            mode = choose_capture_mode(self.config)  # logs which mode and why
        if mode == "none":
            return build_capture(self.config, mode, "")
        checks.require(checks.root_problem(),
                       checks.cgroup2_problem(self.config.capture.cgroup_root) if mode == "ebpf-connect" else None)
        return self._with_source_return(
            build_capture(self.config, mode, self._proxy_cgroup() if mode == "ebpf-connect" else ""))

    def _with_source_return(self, capture: Capture) -> Capture:
        """proxy.source_address pod/auto: the capture mode plus the return path for inbound legs that
        leave from the client pod's address (agent.capture.source_return); node: the mode alone."""
        choice = self.config.proxy.source_address
        if choice == "node":
            return capture
        problem = transparent_allowed()
        if problem and choice == "pod":
            raise EnvironmentProblem(f"proxy.source_address is pod but {problem}; "
                                     "set proxy.source_address to node (servers then see the node's address)")
        if problem:
            log.warning("proxy.source_address auto: servers will see the node's address: %s", problem)
            return capture
        self.source_return = WithSourceReturn(capture, SourceReturn(self.config.state_dir), required=choice == "pod",
                                              required6=choice == "pod" and self.config.capture.ipv6)
        return self.source_return

    def _check_node(self) -> None:
        if self.config.registry.source != "file":
            return  # checked against the first snapshot (agent/registry/kubernetes/source.py)
        load_registry_for_node(self.config.registry.file, self.config.trust_domain, self.config.node.name)

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or ``stop()``, drain and stop. A SIGHUP during the start is held and
        reloads once started (``_hold_sighup``); the signal handlers ``run`` found come back when it returns."""
        self._hold_sighup()
        try:
            await self._run()
        finally:
            self._remove_signal_handlers(asyncio.get_running_loop())

    async def _run(self) -> None:
        config = self.config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        keep_heap_for_relaying()  # bulk throughput: no brk/page-fault churn per chunk (agent.proxy.heap)
        require_verified_chain()  # the inbound proxy reads each tunnel's chain (expiry, root): fail closed at start
        self._check_node()
        identities = self._build_identities()
        # proxy.kernel_tls: the start-up probe decides auto; on refuses to start here (KernelTlsUnavailable)
        self.kernel_tls = await kernel_tls_for(config.proxy.kernel_tls)
        identities.set_context_hook(self.kernel_tls.adopt if self.kernel_tls.active else None)
        loop = asyncio.get_running_loop()
        self.policy = PolicySource(config.policy.dir, config.policy.default_action == "ALLOW",
                                   config.policy.root_namespace)
        self._reload_policy()
        ctx = ProxyContext(loop=loop, node_name=config.node.name, registry=self.registry,
                           identities=identities, metrics=self.metrics, flows=self.flows,
                           inbound_port=config.proxy.inbound_port,
                           connect_timeout=config.proxy.connect_timeout_seconds, policy=self.policy,
                           handshake_timeout=config.proxy.handshake_timeout_seconds,
                           tunnel_timeout=config.proxy.tunnel_timeout_seconds,
                           inbound_idle_timeout=config.proxy.inbound_tunnel_idle_seconds,
                           revoked_grace=config.proxy.revoked_tunnel_grace_seconds,
                           limits=self._connection_limits(), handshakes=self._handshake_limits(),
                           buffer_gate=self._buffer_gate(), kernel_tls=self.kernel_tls)
        self.ctx = ctx
        self.admin = AdminServer(config.admin.address, config.admin.port, self.prometheus,
                                 is_ready=lambda: self.ready, flows=self.flows.snapshot,
                                 certs=self._certs_report, not_ready_reason=lambda: self.not_ready_reason,
                                 status=self.status, warning=self._warning,
                                 allowed=admin_allowed_sources(config.admin),
                                 refused=lambda reason: self.metrics.admin_refused.labels(reason).inc(),
                                 ready_detail=lambda: self.kubernetes.unreachable() if self.kubernetes else "")
        self.admin.start()
        if self.access_log is not None:
            self.access_log.start()
        servers: list[asyncio.base_events.Server] = []
        admin_socket: AdminSocket | None = None
        background: list[asyncio.Task] = []  # control-plane loops, cancelled at shutdown
        outbound: OutboundProxy | None = None
        kubernetes: KubernetesSource | None = None  # registry.source: kubernetes
        egress = None  # the kernel's events of connects outside the mesh (ebpf-connect)
        addresses: NodeAddressFollower | None = None  # this node's addresses, followed as they change
        try:
            self.capture = self._build_capture()
            self.capture.start()
            if self.source_return is not None:
                ctx.source_mark, ctx.source_mark6 = self.source_return.source_mark, self.source_return.source_mark6
            log.info("servers see meshed connections from %s (proxy.source_address %s)",
                     source_address_summary(ctx.source_mark, ctx.source_mark6), config.proxy.source_address)
            self.prometheus.register(CaptureEventsCollector(self.capture.name, self.capture.counters))
            if self.capture.inbound is not None:
                self.prometheus.register(PlaintextCollector(self.capture.inbound.plaintext, self._snapshot_or_none,
                                                            config.node.name))
            self._start_tcp_stats(ctx)
            egress = self._start_egress_events(loop)
            same_node = SameNodePath(ctx) if config.proxy.same_node == "local" else None
            log.info("same-node connections: %s (proxy.same_node %s)", "authorized and relayed in process, no "
                     "tunnel to this node" if same_node else "through the mTLS tunnel and the inbound proxy",
                     config.proxy.same_node)
            outbound = OutboundProxy(ctx, self.capture.origin, config.proxy.tunnel_idle_seconds, same_node)
            inbound = InboundProxy(ctx)
            self.workloads = WorkloadController(
                config.node.name, config.trust_domain, config.registry.file if config.registry.source == "file" else "",
                os.path.join(config.state_dir, RUNTIME_WORKLOADS_FILE), self.capture, identities,
                on_change=self._workloads_changed, own_addresses=_node_port_addresses)
            addresses = _follow_node_addresses(loop, self.workloads)  # subscribed before the first read of them
            if config.registry.source == "kubernetes":
                from agent.registry.kubernetes.source import start_kubernetes_source  # only then: ~0.6 MiB

                kubernetes = await start_kubernetes_source(config, self.workloads)  # first snapshot applied
                self.kubernetes = kubernetes
                self.metrics.registry_source_up.set_function(lambda: 0.0 if kubernetes.unreachable() else 1.0)
            else:
                self.workloads.load()
                self.metrics.registry_source_up.set(1)
            admin_socket = AdminSocket(config.admin.socket, self.workloads, flows=lambda req: self._flows(ctx, req),
                                       ops={"status": lambda req: {"status": self.status()},
                                            "certs": lambda req: {"certs": self._certs_report()},
                                            "policy.explain": self._policy_explain},
                                       async_ops={"identity.reload": self._reload_identity})
            await admin_socket.start()
            runtime = RuntimeStats(ctx, lambda: outbound.pool.open_sessions)
            self.prometheus.register(runtime)
            background = [loop.create_task(runtime.sample_forever(config.telemetry.report_interval_seconds)),
                          loop.create_task(self._watch_sources()),
                          loop.create_task(ctx.report_forever(config.telemetry.report_interval_seconds)),
                          loop.create_task(self.rotator.run()),
                          loop.create_task(outbound.pool.reap_forever())]
            if ctx.buffer_gate is not None:
                background.append(loop.create_task(wake_ended_forever(ctx.buffer_gate)))
            if self._config_watch is not None:
                background.append(loop.create_task(self._config_watch.run()))
                log.info("config file %s: %s", self.config_path, "watched (config_file.watch): a change applies as "
                         "`tcpmesh identity reload` would" if config.config_file.watch else
                         "applied again by `tcpmesh identity reload` (config_file.watch is off)")
            idle = config.proxy.stream_idle_timeout_seconds
            if idle:
                background.append(loop.create_task(sweep_idle_relays(
                    ctx.relays, idle, lambda relay, flow: reset_idle(relay, flow, idle))))
            if kubernetes is not None:
                background.append(loop.create_task(kubernetes.run()))
            if self.capture.refusals is not None:  # ebpf-tc, iptables: what their node table resets, made visible
                background.append(loop.create_task(read_refusals_forever(self.capture.refusals.read_refusals,
                                                                         self._refusal_report())))
            trim = heap_trimmer()
            if trim is not None:
                background.append(loop.create_task(trim_heap_forever(trim)))
            self._install_signal_handlers(loop)
            if not await self._policy_gate():
                return  # stopped before a policy set loaded: no listener was ever opened
            if not await self._first_svids_gate():
                return  # stopped before this node joined the issuer / got its SVIDs: no listener opened
            outbound_sock = listening_socket(config.proxy.bind_address, config.proxy.outbound_port,
                                             transparent=self.capture.listener.transparent)
            inbound_sock = listening_socket(config.proxy.bind_address, config.proxy.inbound_port)
            servers = [await loop.create_server(outbound.protocol_factory, sock=outbound_sock),
                       await loop.create_server(inbound.protocol_factory, sock=inbound_sock)]
            frozen = freeze_startup_objects()
            log.info("tunnel data path: %s; %d start-up objects frozen out of the garbage collector's walks",
                     hotpath.describe(), frozen)
            self.ready = True
            self.not_ready_reason = ""
            self.metrics.ready.set(1)
            log.info("agent ready on node %s: %d local workloads captured (%s), outbound :%d, inbound :%d, "
                     "admin %s:%d and %s", config.node.name, self._captured_count(), self.capture.name,
                     config.proxy.outbound_port, config.proxy.inbound_port, config.admin.address, config.admin.port,
                     config.admin.socket)
            sdnotify.ready(f"ready: {self._captured_count()} local workloads captured ({self.capture.name})")
            await self._stop.wait()
            for server in servers:  # first: from here a pod's new connect is refused, never accepted and dropped
                server.close()
            log.info("stopping: capture stays in place (fail closed), draining connections for up to %.1fs",
                     config.proxy.drain_seconds)
            self.ready = False
            self.not_ready_reason = "stopping"
            self.metrics.ready.set(0)
            sdnotify.stopping("draining connections; capture stays in place (fail closed)")
            # capture (and the return path of proxy.source_address pod) stays until the drain ends: the
            # connections being drained still need it; `finally` detaches it
            await ctx.drain(config.proxy.drain_seconds)
        finally:
            self._remove_signal_handlers(loop)
            for task in (*background, *self._signal_reloads):
                task.cancel()
            await _ended(background, STOP_TASKS_SECONDS)
            if outbound is not None:
                outbound.pool.close_all("agent stopping")
            if kubernetes is not None:
                kubernetes.stop()
            if admin_socket is not None:
                await admin_socket.stop()
            if egress is not None:
                loop.remove_reader(egress.fileno())
                egress.close()
            if addresses is not None:
                addresses.close()
            self._detach_capture()
            self.admin.stop()
            if self.access_log is not None:
                self.access_log.stop()
            if self.tcp_stats is not None:
                self.tcp_stats.close()
            log.info("agent stopped")

    async def _watch_sources(self) -> None:
        """Poll the registry file and the policy directory; each change is applied as a whole or not at all."""
        interval = min(self.config.registry.poll_seconds, self.config.policy.poll_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                self.workloads.reload_file()
                self._reload_policy()
            except Exception:  # a task root: keep watching whatever one reload did
                log.exception("reloading the registry or the policies failed")
            self.metrics.registry_errors.set(self.workloads.file_errors)

    def _reload_policy(self) -> None:
        errors_before = self.policy.load_errors
        if self.policy.reload() and self.workloads is not None and self.workloads.snapshot is not None:
            self._apply_inbound_modes(self.workloads.snapshot)
        if self.policy.load_errors > errors_before:
            self.metrics.policy_load_errors.inc(self.policy.load_errors - errors_before)
        self.metrics.policy_change_refused.set(1 if self.policy.in_force and self.policy.refused else 0)
        if self.policy.in_force:
            self._policy_in_force.set()
        elif not self.ready:
            self.not_ready_reason = f"no policy set is in force: {self.policy.last_error}"

    async def _policy_gate(self) -> bool:
        """Wait (listeners closed, capture attached: pods' connects are refused) until a policy set loads.

        A policy set that cannot be loaded at start never means "no policies" (docs/policy.md "At
        start"): the agent stays not ready and says why on /readyz, in systemd's STATUS= and in its
        log, while ``_watch_sources`` retries every poll. False when the agent was stopped meanwhile.
        """
        if self._policy_in_force.is_set():
            return True
        log.error("NOT READY: %s. Capture stays attached and no connection is proxied, so the local pods' "
                  "connections are refused and every local workload is STRICT, until the policy files load "
                  "(fix them; `tcpmesh policy check %s` shows every problem)", self.not_ready_reason,
                  self.config.policy.dir)
        sdnotify.status(f"NOT READY (pods' connections refused): {self.not_ready_reason}")
        stop = asyncio.ensure_future(self._stop.wait())
        loaded = asyncio.ensure_future(self._policy_in_force.wait())
        try:
            await asyncio.wait((stop, loaded), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            loaded.cancel()
        if not self._policy_in_force.is_set():
            return False
        log.info("the policy set loaded: turning ready")
        return True

    async def _first_svids_gate(self) -> bool:
        """Issuer mode: stay not ready (listeners closed, capture attached: pods' connects refused) until this
        node has joined the issuer and every local identity has its first SVID — or, once joined, until
        identity.issuer.first_svid_wait_seconds have passed: then ready, with an error and
        tcpmesh_agent_ready_without_svids naming what still waits. Never joined: not ready, however long.
        systemd's start timeout is extended all along (EXTEND_TIMEOUT_USEC every 2 s, with STATUS= saying
        why). A refused join ends the agent (TcpmeshError).
        docs/identity.md "The agent and the issuer". False when the agent was stopped meanwhile."""
        source = getattr(self.rotator, "_source", None)
        if self.config.identity.mode != "issuer" and self.rotator is not None:
            return await self._local_svids_gate()
        if self.config.identity.mode != "issuer" or source is None:
            return True
        loop = asyncio.get_running_loop()
        limit = self.config.identity.issuer.first_svid_wait_seconds
        started, joined_at, said, extended = loop.time(), None, "", 0.0
        while not self._stop.is_set():
            state = source.state
            if state.join_refused:
                raise CaError(f"{state.join_refused}; put a new one-time token (`tcpmesh issuer token "
                              f"{self.config.node.name}`) in identity.issuer.bootstrap_token_file and start the agent "
                              "again")
            pending = sorted(i.uri for i in self.rotator.store.pending())
            if source.joined:
                joined_at = loop.time() if joined_at is None else joined_at
                if not pending:
                    break
                if loop.time() - joined_at >= limit:
                    self.metrics.ready_without_svids.set(len(pending))
                    log.error("READY WITHOUT SVIDS after identity.issuer.first_svid_wait_seconds (%.0fs): %s still "
                              "have none, so their workloads' connects are refused until the issuer signs them "
                              "(`tcpmesh status` shows each one's last error and next retry)", limit, ", ".join(pending))
                    break
                reason = f"waiting for the first SVIDs of {', '.join(pending)} (up to {limit:.0f}s)"
            else:
                reason = (f"not joined to the issuer yet ({state.join_failures} attempt(s) failed: {state.last_error}; "
                          f"next at {state.join_retry_at.isoformat() if state.join_retry_at else 'now'})")
            if loop.time() - extended >= FIRST_SVIDS_EXTEND_EVERY_SECONDS:   # TimeoutStartSec must not kill it
                extended = loop.time()
                sdnotify.extend_start(FIRST_SVIDS_EXTEND_SECONDS, f"NOT READY (pods' connections refused): {reason}")
            if reason.split(" (")[0] != said:
                said = reason.split(" (")[0]
                log.warning("NOT READY: %s", reason)
                sdnotify.status(f"NOT READY (pods' connections refused): {reason}")
            self.not_ready_reason = reason
            try:
                await asyncio.wait_for(self._stop.wait(), FIRST_SVIDS_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
        if self._stop.is_set():
            return False
        log.info("identities settled %.2fs after the policy set loaded: turning ready", loop.time() - started)
        return True

    async def _local_svids_gate(self) -> bool:
        """node_ca mode: the registry's first reconcile ran on this loop, which mints nothing (a new identity is
        pending until the rotator's thread has minted it: IdentityStore ``sign_off_loop``); turn ready once
        every local identity has its SVID — a local mint, so a wait of a worker start (≈ 0.1 s) — or after
        identity.issuer.first_svid_wait_seconds, with an error naming what still waits. False when stopped."""
        loop = asyncio.get_running_loop()
        started, limit = loop.time(), self.config.identity.issuer.first_svid_wait_seconds
        while not self._stop.is_set():
            pending = sorted(i.uri for i in self.rotator.store.pending())
            if not pending:
                return True
            if loop.time() - started >= limit:
                self.metrics.ready_without_svids.set(len(pending))
                log.error("READY WITHOUT SVIDS after %.0fs: %s still have none (the minting worker failed: see the "
                          "certificate rotation errors above); their workloads' connects are refused until minted",
                          limit, ", ".join(pending))
                return True
            try:
                await asyncio.wait_for(self._stop.wait(), FIRST_SVIDS_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
        return False

    def _apply_inbound_modes(self, registry: Registry) -> None:
        """PeerAuthentication → the kernel: each local workload STRICT or PERMISSIVE (docs/policy.md)."""
        if self.policy is None or self.capture is None:
            return
        enforcement = self.capture.inbound
        modes = {}
        for workload in registry.local(self.config.node.name):
            strict = self.policy.mtls_mode(workload.namespace, workload.name) is MtlsMode.STRICT
            modes[workload.key] = strict
            if self._inbound_modes.get(workload.key) == strict:
                continue
            if enforcement is None:
                if strict:
                    log.error("workload %s is STRICT but capture mode %s cannot enforce it in the kernel; "
                              "use capture.mode ebpf-connect", workload.key, self.capture.name)
                continue
            try:
                enforcement.set_inbound_mode(workload, strict)
            except Exception:  # noqa: BLE001 — one workload's kernel update must not stop the others
                log.exception("cannot set the inbound mode of %s", workload.key)
                modes.pop(workload.key)
                continue
            log.info("workload %s inbound mode: %s", workload.key, "STRICT" if strict else "PERMISSIVE")
        self._inbound_modes = modes

    def _workloads_changed(self, registry: Registry) -> None:
        self._cut_departed(registry)
        self.metrics.workloads.set(self._captured_count(registry))
        self._apply_inbound_modes(registry)
        self.metrics.retain((w.namespace, w.name) for w in registry.workloads)  # departed workloads' series go
        if self.tcp_stats is not None:
            self.tcp_stats.retain((w.namespace, w.name) for w in registry.workloads)
        self.cgroups.set_roots([w.cgroup for w in registry.local(self.config.node.name) if w.cgroup])
        if self.refusals is not None:
            self.refusals.retain({w.key for w in registry.workloads})

    def _cut_departed(self, registry: Registry) -> None:
        """A local workload that left the registry — or whose identity or address changed — is gone:
        its open connections are reset at once, each recorded DC (docs/registry.md "Removing a workload").
        Its pod cannot use them well any more (a deleted pod's netns is going; a reused address
        belongs to someone else), and none may keep the old identity's authorization."""
        local = {w.key: w for w in registry.local(self.config.node.name)}
        departed = {(old.namespace, old.name): old for key, old in self._local.items()
                    if key not in local or (local[key].spiffe_id, local[key].ip) != (old.spiffe_id, old.ip)}
        self._local = local
        if departed and self.ctx is not None:
            names = ", ".join(sorted(w.key for w in departed.values()))
            cut = self.ctx.cut(set(departed), f"workload {names} left the registry")
            if cut:
                log.warning("workload %s left the registry: %d open connection(s) reset", names, cut)

    def _start_egress_events(self, loop: asyncio.AbstractEventLoop):
        """Connects outside the mesh, reported by the kernel, into metrics and the access log."""
        if self.capture is None or self.capture.egress is None:
            return None
        report = EgressReport(self.config.node.name, self._snapshot_or_none, self.cgroups, self.flows, self.metrics)
        reader = self.capture.egress.egress_reader(report.on_event)
        loop.add_reader(reader.fileno(), reader.drain)
        return reader

    def _refusal_report(self) -> RefusalReport:
        """The node table's resets → tcpmesh_node_refused_connections_total and a warning per pod (agent.telemetry.refusals)."""
        def count(refusal: Refusal, n: int) -> None:
            source = refusal.source
            self.metrics.refused(source.name if source else UNKNOWN, source.namespace if source else UNKNOWN,
                                 source.spiffe_id.uri if source else UNKNOWN, refusal.reason, n)

        self.refusals = RefusalReport(self.capture.name, self._snapshot_or_none, count)
        return self.refusals

    def _start_tcp_stats(self, ctx: ProxyContext) -> None:
        """Kernel TCP stats of the proxy's sockets (telemetry.tcp_stats), scraped with /metrics."""
        self.tcp_stats = tcp_stats_from_config(self.config, self._proxy_cgroup)
        if self.tcp_stats is not None:
            ctx.tcp_stats = self.tcp_stats
            self.prometheus.register(self.tcp_stats)

    def _flows(self, ctx: ProxyContext, request: dict) -> dict:
        """The admin socket's flows.list: live bytes first, then open and recently closed flows."""
        try:
            port = int(request["port"]) if request.get("port") else None
            after = int(request.get("after") or 0)
        except (TypeError, ValueError) as exc:
            raise TcpmeshError(f"flows.list: port and after must be whole numbers ({exc})") from exc
        workload = request.get("workload") or None
        if workload is not None and not after:  # (each --follow poll would ask again)
            self._require_workload("--workload", str(workload))
        ctx.report_progress()
        return self.flows.query(workload=workload, port=port, after=after)

    def _captured_count(self, registry: Registry | None = None) -> int:
        registry = registry or self.registry()
        failures = self.workloads.attach_failures if self.workloads else {}
        return sum(1 for w in registry.local(self.config.node.name) if w.key not in failures)

    def _detach_capture(self) -> None:
        if self.capture is not None:
            self.capture.stop()
            self.capture = None

    def _hold_sighup(self) -> None:
        """From ``run``'s first line: a SIGHUP (``kill -HUP``, a log rotation's habit) during the blocking start (the
        identity source's first load — in issuer mode the start's join —, capture compiled and attached, the
        registry's first snapshot), before the handlers of ``_install_signal_handlers`` are in, is remembered
        instead of ending the agent by its default action, and reloads once they are.
        SIGTERM and SIGINT keep their defaults there: a stop during the start ends the agent at once, capture
        attached (fail closed)."""
        try:
            previous = signal.signal(signal.SIGHUP, self._sighup_during_start)
        except ValueError:  # not the main thread (an agent on a test's thread): signals are not this agent's
            return
        self._previous_handlers.setdefault(signal.SIGHUP, previous)

    def _sighup_during_start(self, signum: int, frame: Any) -> None:
        self._sighup_held = True

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM, SIGINT: stop; SIGHUP: reload the config file (one held during the start runs now). The
        handlers they had before ``run`` come back at the stop."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_reload)
        if self._sighup_held:
            self._sighup_held = False
            log.warning("SIGHUP came during the start: the config reload it asked for runs now")
            self._signal_reload()

    def _signal_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_on_signal())
        self._signal_reloads.add(task)  # held until done (the loop keeps only a weak reference)
        task.add_done_callback(self._signal_reloads.discard)

    def _remove_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig, previous in self._previous_handlers.items():
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)
        self._previous_handlers.clear()

    def stop(self) -> None:
        self._stop.set()


async def _ended(tasks: list[asyncio.Task], timeout: float) -> None:
    """Wait for cancelled control-plane tasks to end, at most ``timeout``: the stop's own deadline. One still
    running then (a step that ignores its cancel) is named in an error line and cancelled again, which ends
    whatever it awaits (the identity rotator's wait for its step in flight)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        log.error("stopping: %s did not end within %.0fs of being cancelled; cancelled again", ", ".join(
            sorted(getattr(t.get_coro(), "__qualname__", t.get_name()) for t in pending)), timeout)
        for task in pending:
            task.cancel()


def source_address_summary(mark: int, mark6: int) -> str:
    """Which address servers see, for the start-up log line."""
    if mark and mark6:
        return "the client pod's own address (IPv4 and IPv6)"
    if mark:
        return "the client pod's own address (IPv4; IPv6 servers see this node's address)"
    return "this node's address"


LISTEN_BACKLOG = 4096


def listening_socket(address: str, port: int, transparent: bool = False) -> socket.socket:
    """A bound, listening TCP socket; IP_TRANSPARENT when the capture mode delivers foreign destinations."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError("listen", f"{address}:{port}", exc.errno,
                          "is another agent or program using this port?") from exc
    return sock


def _node_port_addresses() -> frozenset[str]:
    """This node's local addresses (the agent runs in the node's network namespace), where kube-proxy answers
    nodePorts too (agent.control.workloads). Unreadable: none added, said — the InternalIP stays a frontend."""
    from agent.capture.local_addresses import local_addresses  # not pyroute2: ≈ 10 MiB per agent (its docstring)

    try:
        return local_addresses()
    except OSError as exc:
        log.error("could not read this node's addresses (%s): nodePorts are meshed at the registry's node addresses "
                  "only, not at this node's other local addresses", exc)
        return frozenset()


def _follow_node_addresses(loop: asyncio.AbstractEventLoop, workloads: WorkloadController) -> NodeAddressFollower | None:
    """rtnetlink's address notifications on the loop: an address the node gets or loses is applied as a nodePort and
    hostPort frontend at once (agent.control.node_addresses). No subscription: said, the agent runs on."""
    from agent.capture.local_addresses import AddressEvents  # not pyroute2 (its docstring)

    try:
        events = AddressEvents()
    except OSError as exc:
        log.error("could not subscribe to this node's address changes (%s): an address the node gets later is a "
                  "nodePort/hostPort frontend only at the next registry change", exc)
        return None
    follower = NodeAddressFollower(loop, events, workloads.refresh_node_addresses)
    follower.start()
    return follower
