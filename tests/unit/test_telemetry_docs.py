"""Every metric the agent exports is documented in docs/telemetry.md, under its exposition name.

The collectors are the agent's own: Metrics against a fresh CollectorRegistry, plus the runtime,
plaintext, capture-events and kernel TCP stats collectors app.py registers (built without BPF: they still describe
every family they export). A metric added without a line in the docs fails here.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.issuer.metrics import IssuerMetrics
from agent.telemetry.capture_events import CaptureEventsCollector
from agent.telemetry.metrics import Metrics
from agent.telemetry.plaintext import PlaintextCollector
from agent.telemetry.runtime import RuntimeStats
from agent.telemetry.tcpstats import KernelTcpStats

DOC = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    IssuerMetrics(registry)  # the issuer's (tcpmesh issuer run): documented in the same file
    runtime = RuntimeStats(ctx=None)
    runtime.last = {"asyncio_tasks": 0, "connection_tasks": 0, "relays": 0, "outbound_tunnels": 0, "pending_handshakes": 0,
                    "limited": {"source": 0}, "buffer": (0, 0, 0, 0)}
    registry.register(runtime)
    registry.register(PlaintextCollector(lambda: {}, lambda: None, "node1"))
    registry.register(CaptureEventsCollector("ebpf-connect", lambda: {}))
    registry.register(KernelTcpStats("/nonexistent/bpffs", "/nonexistent/cgroup", "/nonexistent/state",
                                     source_dir="/nonexistent/bpf"))
    names = set()
    for family in registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_the_collectors_export_what_the_agent_exports():
    names = exported_names()
    # one of each source, so a collector that silently exports nothing cannot make the next test pass
    assert {"tcpmesh_tcp_connections_opened_total", "tcpmesh_agent_relays", "tcpmesh_plaintext_rejected_total",
            "tcpmesh_tcp_rtt_seconds", "tcpmesh_tcp_stats_series"} <= names
    assert len(names) >= 30


def test_every_exported_metric_is_documented_in_telemetry_md():
    doc = DOC.read_text()
    missing = sorted(name for name in exported_names() if f"`{name}`" not in doc)
    assert not missing, f"docs/telemetry.md does not document (as `name`): {', '.join(missing)}"


def test_every_flow_label_is_documented_in_telemetry_md():
    from agent.connection.flow import METRIC_LABELS

    doc = DOC.read_text()
    missing = [label for label in METRIC_LABELS if f"`{label}`" not in doc]
    assert not missing, f"docs/telemetry.md does not document the flow label(s) {', '.join(missing)}"
