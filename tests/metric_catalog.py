"""Every Prometheus metric tcpmesh exports, read from the collectors themselves — no running agent.

The agent's registry is built as agent/app.py builds it: ``Metrics`` against a fresh ``CollectorRegistry``, then the
collectors the agent registers once it runs (capture events, plaintext, runtime figures, kernel TCP stats), each
built without BPF and with the figures a running agent samples (so every family it can export is there, the
buffer gauges too). The issuer's (`tcpmesh issuer run`) is ``IssuerMetrics``. ``defined_in_source`` reads every
metric name agent/ defines (``ast``, nothing imported), so a collector added to the agent and not here is named
by tests/unit/test_telemetry_docs.py. Used by that test and tests/unit/test_telemetry_deploy.py.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

REPO = Path(__file__).resolve().parents[1]
# prometheus_client's constructors of a metric (the wrappers) and of a family (custom collectors)
CONSTRUCTORS = frozenset({"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum", "CounterMetricFamily",
                          "GaugeMetricFamily", "HistogramMetricFamily", "SummaryMetricFamily", "InfoMetricFamily",
                          "StateSetMetricFamily", "GaugeHistogramMetricFamily", "UnknownMetricFamily"})
# the samples a family of each type exposes, beside its name (prometheus_client also adds ``_created``)
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("", "_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count")}


@dataclass(frozen=True)
class Family:
    name: str          # as defined, without ``_total``
    type: str          # counter, gauge, histogram, ...
    labels: tuple[str, ...]
    process: str       # agent or issuer

    def exposition_names(self) -> tuple[str, ...]:
        """The names its samples carry in /metrics, as a query or a page writes them."""
        return tuple(self.name + suffix for suffix in SUFFIXES[self.type])

    @property
    def documented_name(self) -> str:
        """The one name docs/telemetry.md's table gives it: counters with ``_total``, others as defined."""
        return self.name + "_total" if self.type == "counter" else self.name


def agent_registry() -> tuple[CollectorRegistry, list]:
    """The agent's registry, and every collector on it (the wrappers of ``Metrics`` and the custom collectors)."""
    from agent.telemetry.capture_events import CaptureEventsCollector
    from agent.telemetry.metrics import Metrics
    from agent.telemetry.plaintext import PlaintextCollector
    from agent.telemetry.runtime import RuntimeStats
    from agent.telemetry.tcpstats import KernelTcpStats

    registry = CollectorRegistry()
    wrappers = _wrappers(Metrics(registry))
    runtime = RuntimeStats(ctx=None)
    runtime.last = {"asyncio_tasks": 0, "connection_tasks": 0, "relays": 0, "outbound_tunnels": 0,
                    "pending_handshakes": 0, "limited": {"source": 0}, "buffer": (0, 0, 0, 0),
                    "tunnel_tls": ({"kernel": 0, "user": 0}, {"kernel": 0, "user": 0}, 0, False)}
    custom = [CaptureEventsCollector("ebpf-connect", lambda: {}), PlaintextCollector(lambda: {}, lambda: None, "node1"),
              runtime, KernelTcpStats("/nonexistent/bpffs", "/nonexistent/cgroup", "/nonexistent/state",
                                      source_dir="/nonexistent/bpf")]
    for collector in custom:
        registry.register(collector)
    return registry, [*wrappers, *custom]


def issuer_registry() -> tuple[CollectorRegistry, list]:
    from agent.issuer.metrics import IssuerMetrics

    registry = CollectorRegistry()
    return registry, _wrappers(IssuerMetrics(registry))


def families() -> dict[str, Family]:
    """name → Family, of the agent and the issuer."""
    found: dict[str, Family] = {}
    for process, build in (("agent", agent_registry), ("issuer", issuer_registry)):
        registry, collectors = build()
        labels = {}  # prometheus_client has no public reader of label names: _labelnames (a change fails here)
        for collector in collectors:
            if isinstance(collector, MetricWrapperBase):
                labels[collector._name] = tuple(collector._labelnames)
            else:
                labels.update({family.name: tuple(family._labelnames) for family in collector.collect()})
        for family in registry.collect():
            assert family.name in labels, f"no label names known for {family.name}"
            assert family.name not in found, f"{family.name} is defined twice"
            found[family.name] = Family(family.name, family.type, labels[family.name], process)
    return found


def exposition_names(process: str | None = None) -> set[str]:
    return {name for family in families().values() if process in (None, family.process)
            for name in family.exposition_names()}


def defined_in_source(root: Path = REPO / "agent") -> list[tuple[str, str]]:
    """(file:line, name) of every metric agent/ defines: the first argument (or ``name=``) of a constructor in
    ``CONSTRUCTORS`` that is a ``tcpmesh_`` string; an f-string gives its literal head, ending in ``*`` (a prefix)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            named = [k.value for k in node.keywords if k.arg == "name"]
            if func not in CONSTRUCTORS or not (node.args or named):
                continue
            first = node.args[0] if node.args else named[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                name = first.value
            elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                name = f"{first.values[0].value}*"
            else:
                continue
            if name.startswith("tcpmesh_"):
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", name))
    return found


def _wrappers(holder: object) -> list[MetricWrapperBase]:
    return [value for value in vars(holder).values() if isinstance(value, MetricWrapperBase)]
