"""Every tcpmesh metric, defined in one place against an injected ``CollectorRegistry``.

Labels are identities, ports and results — never addresses (those go to flow records). Imports only
prometheus_client. Called from the data-path loop only (``flow_*``, ``retain``); the admin thread
only reads through ``generate_latest``.

Cardinality: every flow series is keyed by (reporter, source workload, destination workload,
security, response_flags); the identity labels are functions of the workloads. ``retain`` removes
the series of workloads that left the registry, so the bound is set by the workloads that exist,
not by the ones that ever existed (docs/telemetry.md gives the numbers).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.audit.chain import FINDING_KINDS as CHAIN_BREAK_KINDS
from agent.connection.flow import FLAG_NONE, METRIC_LABELS, UNKNOWN, Flow

# The labels of series that must not change while a flow is open (response_flags may): all but the last.
OPEN_LABELS = tuple(name for name in METRIC_LABELS if name != "response_flags")
OPEN_LABEL_COUNT = len(OPEN_LABELS)  # METRIC_LABELS ends with response_flags: open values are a prefix
# tcpmesh_egress_outside_mesh: who connected, and the kernel's decision (no destination: never a 5-tuple)
EGRESS_LABELS = ("source_workload", "source_workload_namespace", "source_principal", "decision")
# tcpmesh_node_refused_connections: who was refused in the node's table, and why (never the address or port)
REFUSED_LABELS = ("source_workload", "source_workload_namespace", "source_principal", "reason")
PAIR_LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal",
               "destination_workload", "destination_workload_namespace", "destination_principal")
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

WorkloadKey = tuple[str, str]  # (namespace, name)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections_opened = Counter(
            "tcpmesh_tcp_connections_opened", "TCP connections opened through the mesh", METRIC_LABELS,
            registry=registry)
        self.connections_closed = Counter(
            "tcpmesh_tcp_connections_closed", "TCP connections closed through the mesh (counted once opened)",
            METRIC_LABELS, registry=registry)
        self.connections_failed = Counter(
            "tcpmesh_tcp_connections_failed",
            "TCP connections that ended with a response flag other than '-' (refused, denied, reset, ...)",
            METRIC_LABELS, registry=registry)
        self.open_connections = Gauge(
            "tcpmesh_tcp_open_connections", "TCP connections open through the mesh now", OPEN_LABELS,
            registry=registry)
        self.sent_bytes = Counter(
            "tcpmesh_tcp_sent_bytes", "Bytes sent toward the client (response direction); reported while "
            "the connection is open", METRIC_LABELS, registry=registry)
        self.received_bytes = Counter(
            "tcpmesh_tcp_received_bytes", "Bytes received from the client (request direction); reported "
            "while the connection is open", METRIC_LABELS, registry=registry)
        # Labelled by reporter only: a handshake is a property of the node pair and its CPUs more than
        # of the workloads (a pooled tunnel serves many), and histograms multiply series by buckets.
        self.handshake_duration = Histogram(
            "tcpmesh_tunnel_handshake_duration_seconds",
            "mTLS handshake of a new tunnel between nodes, from TCP connected to TLS established", ("reporter",),
            buckets=HANDSHAKE_BUCKETS, registry=registry)
        for reporter in ("source", "destination"):  # present from the start: rates see the first handshake
            self.handshake_duration.labels(reporter)
        self.ready = Gauge("tcpmesh_agent_ready", "1 when capture and listeners are in place", registry=registry)
        self.workloads = Gauge("tcpmesh_local_workloads", "Workloads captured on this node", registry=registry)
        self.policy_load_errors = Counter("tcpmesh_policy_load_errors",
                                          "Policy directory changes refused because a file was invalid",
                                          registry=registry)
        self.policy_change_refused = Gauge(
            "tcpmesh_policy_change_refused", "1 while the policy directory holds a change the agent refused (an "
            "invalid file; the previous set stays in force and the change's valid edits are held back)",
            registry=registry)
        # The config file's reloads (`tcpmesh identity reload`, config_file.watch): agent.control.identity_switch
        self.config_reloads = Counter(
            "tcpmesh_config_reloads", "Reloads of the agent's config file by trigger (command: `tcpmesh identity "
            "reload`; watch: the file changed; signal: SIGHUP) and result (applied, unchanged, refused: the last good "
            "config keeps running)", ("trigger", "result"), registry=registry)
        self.config_refused = Gauge(
            "tcpmesh_config_file_refused", "1 while the last reload of the config file was refused (the file does not "
            "validate or its identity switch failed; the last good config keeps running)", registry=registry)
        self.config_restart_needed = Gauge(
            "tcpmesh_config_restart_needed_fields", "Settings changed in the config file that apply only at a restart "
            "(the agent runs on with the old values; `tcpmesh status` names them)", registry=registry)
        self.registry_errors = Gauge("tcpmesh_registry_file_errors",
                                     "Versions of the registry file that could not be applied", registry=registry)
        self.registry_source_up = Gauge("tcpmesh_registry_source_up",
                                        "1 while the registry source answers (kubernetes: list/watch of the API "
                                        "server works; 0: the agent serves the last known state)", registry=registry)
        # Identity (agent.identity.svid_rotator): one series per local identity, removed when it goes.
        # `workload` is the SPIFFE ID: SVIDs are per identity, and replicas of one workload share it.
        self.certificate_expiry = Gauge(
            "tcpmesh_certificate_expiry_timestamp_seconds", "Expiry (unix time) of the SVID served for a local identity",
            ("workload",), registry=registry)
        self.certificate_renewals = Counter(
            "tcpmesh_certificate_renewals", "SVIDs re-issued (on schedule, or under a new node CA / trust bundle)",
            ("workload",), registry=registry)
        self.certificate_renewal_failures = Counter(
            "tcpmesh_certificate_renewal_failures", "SVID renewals that failed (the old certificate stays in use "
            "while valid; retried with backoff)", ("workload",), registry=registry)
        self.node_ca_expiry = Gauge(
            "tcpmesh_node_ca_expiry_timestamp_seconds", "Expiry (unix time) of the CA this agent signs SVIDs with "
            "(its node intermediate): re-issue it with `tcpmesh ca issue-node` before then", registry=registry)
        # identity.mode issuer (docs/identity.md "The agent and the issuer")
        self.issuer_up = Gauge(
            "tcpmesh_identity_issuer_up", "1 if the last request to the issuer was answered, 0 if no issuer "
            "address answered (current SVIDs stay in service until they expire)", registry=registry)
        self.issuer_join_failures = Counter(
            "tcpmesh_issuer_join_failures", "Attempts to join the issuer that found no issuer answering (retried "
            "with backoff; the agent stays not ready until it joins)", registry=registry)
        self.awaiting_first_svid = Gauge(
            "tcpmesh_identity_awaiting_first_svid", "1 for each local identity that has no SVID yet (its workloads' "
            "connects are refused until it arrives)", ["workload"], registry=registry)
        self.ready_without_svids = Gauge(
            "tcpmesh_agent_ready_without_svids", "Local identities still without an SVID when the agent turned ready "
            "at identity.issuer.first_svid_wait_seconds", registry=registry)
        self.node_credential_expiry = Gauge(
            "tcpmesh_node_credential_expiry_timestamp_seconds", "Expiry (unix time) of this node's credential at "
            "the issuer (renewed at half its lifetime)", registry=registry)
        self.access_log_records = Counter(
            "tcpmesh_access_log_records", "Access/audit records written", registry=registry)
        self.access_log_dropped = Counter(
            "tcpmesh_access_log_dropped_records", "Access/audit records lost (a gap record in the log says so)",
            ("reason",), registry=registry)
        for reason in ("queue_full", "write_error"):  # present at 0 from the start, so rates and alerts work
            self.access_log_dropped.labels(reason)
        self.access_log_write_errors = Counter(
            "tcpmesh_access_log_write_errors", "Failed writes to the access/audit log (disk full, I/O error)",
            registry=registry)
        self.access_log_chain_breaks = Counter(
            "tcpmesh_access_log_chain_breaks", "Problems the access log writer found in the existing log's chain on "
            "start (a changed, forged, removed or torn record; a break record in the log names each)", ("kind",),
            registry=registry)
        for kind in CHAIN_BREAK_KINDS:  # present at 0 from the start, so alerts work
            self.access_log_chain_breaks.labels(kind)
        self.access_log_sequence = Gauge(
            "tcpmesh_access_log_sequence", "Sequence number of the last record written to the access/audit log "
            "(compare with the log's last record: records removed from its end show up here)", registry=registry)
        # agent.proxy.inbound: connections reset at accept by the handshake caps (agent.proxy.limits)
        self.handshakes_refused = Counter(
            "tcpmesh_inbound_handshakes_refused", "Inbound connections reset at accept because too many TLS "
            "handshakes were unauthenticated at once (limit=total: proxy.max_handshakes; per_source: "
            "proxy.max_handshakes_per_source)", ("limit",), registry=registry)
        for limit in ("total", "per_source"):
            self.handshakes_refused.labels(limit)
        # agent.telemetry.admin (its own threads; prometheus_client counters are thread-safe)
        self.admin_refused = Counter(
            "tcpmesh_admin_refused", "Connections to the admin HTTP port closed at accept: source = not the node "
            "itself nor admin.allowed_sources (a pod, another host); busy = every admin worker taken",
            ("reason",), registry=registry)
        for reason in ("source", "busy"):
            self.admin_refused.labels(reason)
        # agent.proxy.limits: refusals by side and cap; all four series present at 0 from the start
        self.connection_limit_hits = Counter(
            "tcpmesh_connection_limit_hits", "Connections refused because a concurrent-connection cap was reached "
            "(proxy.max_connections: limit=total; proxy.max_connections_per_identity: limit=per_identity)",
            ("reporter", "limit"), registry=registry)
        for reporter in ("source", "destination"):
            for limit in ("total", "per_identity"):
                self.connection_limit_hits.labels(reporter, limit)
        self.egress_outside_mesh = Counter(
            "tcpmesh_egress_outside_mesh", "TCP connects from pods to destinations outside the mesh, seen by the "
            "kernel's connect hook and never proxied: decision allow = left from the pod itself, deny = refused "
            "at connect() (policy.outbound_passthrough DENY)", EGRESS_LABELS, registry=registry)
        self.node_refused = Counter(
            "tcpmesh_node_refused_connections", "TCP connections from pods reset in the node's nftables table by the "
            "packet-level capture modes (ebpf-tc, iptables), by reason: node_port, host_port (these modes cannot mesh "
            "one port of a node's address), ipv6 (they carry IPv4 only), ipv6_outside_mesh (outbound_passthrough "
            "DENY); read from the kernel every 10 s", REFUSED_LABELS, registry=registry)
        # Series bookkeeping, so that a departed workload's series can be removed; it doubles as a cache of
        # the labelled children (prometheus_client's labels() validates and locks on every call).
        self._flow_metrics = (self.connections_opened, self.connections_closed, self.connections_failed,
                              self.open_connections, self.sent_bytes, self.received_bytes)
        self._names = {m: METRIC_LABELS for m in self._flow_metrics}
        self._names[self.open_connections] = OPEN_LABELS
        self._names[self.egress_outside_mesh] = EGRESS_LABELS
        self._names[self.node_refused] = REFUSED_LABELS
        self._series: dict[object, dict[tuple[str, ...], object]] = {m: {} for m in self._names}
        # id(flow) of an open flow → [received, sent counted, flags, received/sent children, its
        # open_connections label values]: one entry per open flow (a dict entry and an int key cost ~80 B)
        self._live: dict[int, list] = {}
        self._handshakes: set[int] = set()  # id(flow) of flows whose handshake was observed
        self._handshake_children = {reporter: self.handshake_duration.labels(reporter)
                                    for reporter in ("source", "destination")}
        self._known: frozenset[WorkloadKey] | None = None  # None until the first retain()

    # -- flows (data-path loop) -------------------------------------------------------------------
    def flow_opened(self, flow: Flow) -> None:
        values = flow.metric_values()
        self._track(self.connections_opened, values).inc()
        open_values = values[:OPEN_LABEL_COUNT]
        self._track(self.open_connections, open_values).inc()
        self._live[id(flow)] = [0, 0, None, None, None, open_values]

    def flow_progress(self, flow: Flow) -> None:
        """Count the bytes an open flow moved since the last report (live reporting)."""
        done = self._live.get(id(flow))
        if done is None:
            return
        received, sent = flow.bytes_received - done[0], flow.bytes_sent - done[1]
        if received or sent:
            if done[2] != flow.response_flags:  # the children are kept: labels change only with the flags
                values = flow.metric_values()
                done[2:5] = flow.response_flags, self._track(self.received_bytes, values), \
                    self._track(self.sent_bytes, values)
            done[3].inc(received)
            done[4].inc(sent)
            done[0], done[1] = flow.bytes_received, flow.bytes_sent

    def handshake(self, flow: Flow) -> None:
        """Observe the flow's tunnel handshake once, with the flow's labels as complete as they get."""
        if flow.handshake_seconds is None or id(flow) in self._handshakes:
            return
        self._handshakes.add(id(flow))
        child = self._handshake_children.get(flow.reporter) or self.handshake_duration.labels(flow.reporter)
        child.observe(flow.handshake_seconds)

    def flow_closed(self, flow: Flow) -> None:
        key = id(flow)
        self.handshake(flow)
        self._handshakes.discard(key)
        values = flow.metric_values()
        if key in self._live:
            self.flow_progress(flow)
            self._track(self.received_bytes, values)  # the series exists even for an empty connection
            self._track(self.sent_bytes, values)
            open_values = self._live.pop(key)[5]
            self._track(self.connections_closed, values).inc()
            self._track(self.open_connections, open_values).dec()
        if flow.response_flags != FLAG_NONE:
            self._track(self.connections_failed, values).inc()
        if self._known is not None and not _flow_workloads(flow) <= self._known:
            self.prune()  # a flow of a workload that already left: its series go now

    def egress(self, flow: Flow) -> None:
        """A connect outside the mesh the kernel reported (agent.telemetry.egress): counted, never proxied."""
        self._track(self.egress_outside_mesh, (flow.source_workload, flow.source_namespace, flow.source_principal,
                                               flow.decision)).inc()

    def refused(self, workload: str, namespace: str, principal: str, reason: str, count: int) -> None:
        """Connections the node's table reset (agent.telemetry.refusals), ``count`` more since the last read."""
        self._track(self.node_refused, (workload, namespace, principal, reason)).inc(count)

    # -- cardinality --------------------------------------------------------------------------------
    def retain(self, workloads: Iterable[WorkloadKey]) -> None:
        """Keep only the series of ``workloads`` (namespace, name); call whenever the registry changes."""
        self._known = frozenset(workloads)
        self.prune()

    def prune(self) -> int:
        """Remove series naming a workload outside the registry, unless an open flow still uses it."""
        if self._known is None:
            return 0
        busy = {w for state in self._live.values()
                for w in _workloads_of(dict(zip(OPEN_LABELS, state[5])))}
        keep = self._known | busy
        removed = 0
        for metric, series in self._series.items():
            names = self._names[metric]
            for values in list(series):
                if not _workloads_of(dict(zip(names, values))) <= keep:
                    metric.remove(*values)
                    del series[values]
                    removed += 1
        return removed

    def series_count(self) -> int:
        return sum(len(s) for s in self._series.values())

    # -- helpers ------------------------------------------------------------------------------------
    def _track(self, metric, values: tuple[str, ...]):
        """The child of ``metric`` for ``values`` (in the order of its label names), created once."""
        children = self._series[metric]
        child = children.get(values)
        if child is None:
            child = children[values] = metric.labels(*values)
        return child


def _flow_workloads(flow: Flow) -> set[WorkloadKey]:
    """What ``_workloads_of(flow.metric_labels())`` says, without building the labels."""
    found = set()
    if flow.source_workload != UNKNOWN:
        found.add((flow.source_namespace, flow.source_workload))
    if flow.destination_workload != UNKNOWN:
        found.add((flow.destination_namespace, flow.destination_workload))
    return found


def _workloads_of(labels: dict[str, str]) -> set[WorkloadKey]:
    found = set()
    for side in ("source", "destination"):
        name = labels.get(f"{side}_workload", UNKNOWN)
        if name != UNKNOWN:
            found.add((labels.get(f"{side}_workload_namespace", UNKNOWN), name))
    return found
