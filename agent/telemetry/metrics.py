"""Every tcpmesh metric, defined in one place against an injected ``CollectorRegistry``.

Labels are identities, ports and results — never addresses (those go to flow records). Imports only
prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.proxy.flow import METRIC_LABELS, Flow


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections_opened = Counter(
            "tcpmesh_tcp_connections_opened", "TCP connections opened through the mesh", METRIC_LABELS,
            registry=registry)
        self.connections_closed = Counter(
            "tcpmesh_tcp_connections_closed", "TCP connections closed through the mesh", METRIC_LABELS,
            registry=registry)
        self.sent_bytes = Counter(
            "tcpmesh_tcp_sent_bytes", "Bytes sent toward the client (response direction)", METRIC_LABELS,
            registry=registry)
        self.received_bytes = Counter(
            "tcpmesh_tcp_received_bytes", "Bytes received from the client (request direction)", METRIC_LABELS,
            registry=registry)
        self.ready = Gauge("tcpmesh_agent_ready", "1 when capture and listeners are in place", registry=registry)
        self.workloads = Gauge("tcpmesh_local_workloads", "Workloads captured on this node", registry=registry)
        self.policy_load_errors = Counter("tcpmesh_policy_load_errors",
                                          "Policy directory changes refused because a file was invalid",
                                          registry=registry)
        self.registry_errors = Gauge("tcpmesh_registry_file_errors",
                                     "Versions of the registry file that could not be applied", registry=registry)
        # Identity (agent.identity.rotator): one series per local identity, removed when it goes.
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

    def flow_opened(self, flow: Flow) -> None:
        self.connections_opened.labels(**flow.metric_labels()).inc()

    def flow_closed(self, flow: Flow) -> None:
        labels = flow.metric_labels()
        self.connections_closed.labels(**labels).inc()
        self.sent_bytes.labels(**labels).inc(flow.bytes_sent)
        self.received_bytes.labels(**labels).inc(flow.bytes_received)
