"""The issuer's Prometheus metrics (documented in docs/telemetry.md "Issuer"). Labels are ops, results,
reasons and certificate kinds — never a node name or address (a flood of made-up names must not grow series)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class IssuerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("tcpmesh_issuer_requests", "Requests answered, by op and result (ok, refused)",
                                ["op", "result"], registry=registry)
        self.refusals = Counter("tcpmesh_issuer_refusals", "Requests or identities refused, by reason",
                                ["reason"], registry=registry)
        self.issued = Counter("tcpmesh_issuer_certificates_issued", "Certificates signed, by kind (workload, node)",
                              ["kind"], registry=registry)
        self.ca_expiry = Gauge("tcpmesh_issuer_ca_expiry_timestamp_seconds",
                               "When the issuing intermediate expires (re-issue it before then)", registry=registry)
        self.registry_workloads = Gauge("tcpmesh_issuer_registry_workloads",
                                        "Workloads in the registry the placement check reads", registry=registry)
        self.reloads_refused = Counter("tcpmesh_issuer_reloads_refused", "Changed files not applied (the last good "
                                       "ones stay), by what (registry, ca_dir)", ["what"], registry=registry)
        self.connections = Gauge("tcpmesh_issuer_connections", "Open TLS connections from agents", registry=registry)
        self.handshakes = Gauge("tcpmesh_issuer_handshakes", "TLS handshakes in progress (limits.max_handshakes)",
                                registry=registry)
        self.requests_in_flight = Gauge("tcpmesh_issuer_requests_in_flight",
                                        "Requests being answered by the worker threads (limits.workers)",
                                        registry=registry)
