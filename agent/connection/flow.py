"""What one node records of one connection, and the telemetry labels derived from it.

Pure: a ``Flow`` refers to the connection's ``ConnectionFacts`` (frozen, ``facts.py``: addresses,
flow id, client process) and holds the working state the outbound or inbound proxy fills in as the
connection progresses (identities, security, outcome, bytes, times). It is turned into
Istio-vocabulary metric labels (bounded: identities, never addresses) and a JSON-ready record (which
does carry addresses, pid and comm — for the access log and /debug/flows).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from agent.connection.facts import NO_FACTS, ConnectionFacts
from agent.registry.model import Service, Workload

REPORTER_SOURCE = "source"
REPORTER_DESTINATION = "destination"
SECURITY_MTLS = "mutual_tls"
SECURITY_NONE = "none"
UNKNOWN = "unknown"

# response_flags (Envoy/Istio vocabulary where one exists)
FLAG_NONE = "-"
FLAG_UPSTREAM_FAILURE = "UF"  # could not connect to the upstream (tunnel or workload)
FLAG_NO_ROUTE = "NR"  # no original destination, or no node for the destination
FLAG_UPSTREAM_TIMEOUT = "UT"
FLAG_DENY = "DENY"
FLAG_TLS_FAILURE = "TLS_FAILURE"
FLAG_IDENTITY_ERROR = "IDENTITY_ERROR"
FLAG_PROTOCOL_ERROR = "PROTOCOL_ERROR"
FLAG_CONNECTION_TERMINATED = "DC"  # a side reset or vanished mid-stream
FLAG_NO_IDENTITY = "NO_IDENTITY"  # the source pod is not in the registry: fail closed
FLAG_HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"  # a tunnel's TLS handshake did not finish in time (slowloris)
FLAG_OPEN_TIMEOUT = "OPEN_TIMEOUT"  # an authenticated tunnel sent no complete OPEN in time
FLAG_STREAM_IDLE_TIMEOUT = "SI"  # Envoy's stream idle timeout: no byte either way for proxy.stream_idle_timeout_seconds
FLAG_CONNECTION_LIMIT = "CONNECTION_LIMIT"  # proxy.max_connections or max_connections_per_identity reached
FLAG_NO_HEALTHY_UPSTREAM = "UH"  # Envoy's: a Service was dialled and none of its endpoints is ready

METRIC_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "connection_security_policy",
    "response_flags",
)


def new_flow_id() -> bytes:
    return os.urandom(8)


@dataclass(slots=True)  # slots: about 1 KiB less per open or recently closed flow
class Flow:
    reporter: str
    facts: ConnectionFacts = NO_FACTS  # set once, when known; never edited (replace it whole, if ever)
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    source_workload: str = UNKNOWN
    source_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_service: str = UNKNOWN  # Istio's: the dialled Service's host, name.namespace.svc.cluster.local
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    security: str = SECURITY_NONE
    response_flags: str = FLAG_NONE
    bytes_received: int = 0  # client → server (request direction), Istio's received_bytes
    bytes_sent: int = 0  # server → client (response direction), Istio's sent_bytes
    detail: str = ""
    policy: str = ""  # the policy that decided (namespace/name), empty for the default action
    dry_run: str = ""  # what dry-run policies would have decided
    handshake_seconds: float | None = None  # the tunnel's TLS handshake (TlsLeg.handshake_seconds)

    # the facts, read through the flow (what the record, the metrics and the logs name)
    @property
    def flow_id(self) -> str:
        return self.facts.flow_id.hex()

    @property
    def source_ip(self) -> str:
        return self.facts.source_ip

    @property
    def source_port(self) -> int:
        return self.facts.source_port

    @property
    def destination_ip(self) -> str:
        return self.facts.destination_ip

    @property
    def destination_port(self) -> int:
        return self.facts.destination_port

    @property
    def pid(self) -> int | None:
        process = self.facts.process
        return None if process is None else process.pid

    @property
    def uid(self) -> int | None:
        process = self.facts.process
        return None if process is None else process.uid

    @property
    def comm(self) -> str | None:
        process = self.facts.process
        return None if process is None else process.comm

    @property
    def cgroup_id(self) -> int | None:
        return self.facts.cgroup_id

    def set_source(self, workload: Workload | None, principal: str | None = None) -> None:
        if workload is not None:
            self.source_workload = workload.name
            self.source_namespace = workload.namespace
            self.source_principal = workload.spiffe_id.uri
        if principal:
            self.source_principal = principal

    def set_destination(self, workload: Workload | None) -> None:
        if workload is not None:
            self.destination_workload = workload.name
            self.destination_namespace = workload.namespace
            self.destination_principal = workload.spiffe_id.uri

    def set_service(self, service: Service | None) -> None:
        if service is not None:
            self.destination_service = service.host
            self.destination_service_name = service.name
            self.destination_service_namespace = service.namespace

    def fail(self, flag: str, detail: str) -> None:
        if self.response_flags == FLAG_NONE:
            self.response_flags = flag
        self.detail = detail

    def close(self, now: float | None = None) -> None:
        self.end_time = time.time() if now is None else now

    @property
    def open(self) -> bool:
        return self.end_time is None

    @property
    def decision(self) -> str:
        """``deny`` when a policy (or the egress switch) refused the connection, else ``allow``."""
        return "deny" if self.response_flags == FLAG_DENY else "allow"

    def metric_labels(self) -> dict[str, str]:
        return {
            "reporter": self.reporter,
            "source_workload": self.source_workload,
            "source_workload_namespace": self.source_namespace,
            "source_principal": self.source_principal,
            "destination_workload": self.destination_workload,
            "destination_workload_namespace": self.destination_namespace,
            "destination_principal": self.destination_principal,
            "destination_service": self.destination_service,
            "destination_service_name": self.destination_service_name,
            "destination_service_namespace": self.destination_service_namespace,
            "connection_security_policy": self.security,
            "response_flags": self.response_flags,
        }

    def metric_values(self) -> tuple[str, ...]:
        """The values of ``metric_labels()``, in the order of METRIC_LABELS (what prometheus' labels() takes)."""
        return (self.reporter, self.source_workload, self.source_namespace, self.source_principal,
                self.destination_workload, self.destination_namespace, self.destination_principal,
                self.destination_service, self.destination_service_name, self.destination_service_namespace, self.security,
                self.response_flags)

    def record(self) -> dict:
        """Flat and JSON-ready: the facts and the working state (``RECORD_KEYS``, in that order) plus
        ``duration_seconds``. Written out, not ``dataclasses.asdict`` (which copies recursively, at many
        times the cost; this runs for each access record)."""
        facts, process = self.facts, self.facts.process
        return {
            "reporter": self.reporter,
            "flow_id": facts.flow_id.hex(),
            "start_time": self.start_time,
            "end_time": self.end_time,
            "source_workload": self.source_workload,
            "source_namespace": self.source_namespace,
            "source_principal": self.source_principal,
            "source_ip": facts.source_ip,
            "source_port": facts.source_port,
            "pid": None if process is None else process.pid,
            "comm": None if process is None else process.comm,
            "uid": None if process is None else process.uid,
            "cgroup_id": facts.cgroup_id,
            "destination_workload": self.destination_workload,
            "destination_namespace": self.destination_namespace,
            "destination_principal": self.destination_principal,
            "destination_ip": facts.destination_ip,
            "destination_port": facts.destination_port,
            "destination_service": self.destination_service,
            "destination_service_name": self.destination_service_name,
            "destination_service_namespace": self.destination_service_namespace,
            "security": self.security,
            "response_flags": self.response_flags,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "detail": self.detail,
            "policy": self.policy,
            "dry_run": self.dry_run,
            "handshake_seconds": self.handshake_seconds,
            "duration_seconds": None if self.end_time is None else round(self.end_time - self.start_time, 6),
        }


RECORD_KEYS = ("reporter", "flow_id", "start_time", "end_time", "source_workload", "source_namespace",
               "source_principal", "source_ip", "source_port", "pid", "comm", "uid", "cgroup_id",
               "destination_workload", "destination_namespace", "destination_principal", "destination_ip",
               "destination_port", "destination_service", "destination_service_name", "destination_service_namespace",
               "security", "response_flags", "bytes_received", "bytes_sent", "detail",
               "policy", "dry_run", "handshake_seconds", "duration_seconds")
