"""The figures of the benchmark, their medians with min–max, ratios, and issue #8's targets.

Pure: plain dicts and lists in, plain dicts out (JSON-ready); no I/O. A figure's samples are one
value per repetition; a missing sample (the path failed that test) is simply absent.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    vs_direct: bool = True     # False where the direct path has no such figure (memory, proxy CPU, added latency)
    digits: int = 2


FIGURES: tuple[Figure, ...] = (
    Figure("bulk1_gbps", "bulk throughput, 1 stream", "Gbit/s", True),
    Figure("bulk8_gbps", "bulk throughput, 8 streams", "Gbit/s", True),
    Figure("rr_p50_us", "1-byte ping-pong RTT p50", "µs", False, digits=1),
    Figure("rr_p99_us", "1-byte ping-pong RTT p99", "µs", False, digits=1),
    Figure("rr_added_p50_us", "p50 added over direct", "µs", False, vs_direct=False, digits=1),
    Figure("rr1cpu_p50_us", "ping-pong RTT p50, every process on one CPU", "µs", False, digits=1),
    Figure("rr1cpu_added_p50_us", "p50 added over direct, one CPU", "µs", False, vs_direct=False, digits=1),
    Figure("rrnodes_p50_us", "ping-pong RTT p50, each node on its own CPU", "µs", False, digits=1),
    Figure("rrnodes_added_p50_us", "p50 added over direct, a CPU per node", "µs", False, vs_direct=False, digits=1),
    Figure("load_max_per_s", "ping-pong exchanges/s, 8 connections, closed loop", "1/s", True, digits=0),
    Figure("load_p50_us", "RTT p50 at half the slowest tunnel's max rate", "µs", False, digits=1),
    Figure("load_p99_us", "RTT p99 at half the slowest tunnel's max rate", "µs", False, digits=1),
    Figure("crr_per_s", "new connections/s (32 in flight)", "conn/s", True, digits=0),
    Figure("crr_p50_ms", "new connection + exchange, p50", "ms", False, digits=2),
    Figure("rss_idle_mib", "data-path RSS at idle, both nodes", "MiB", False, vs_direct=False, digits=1),
    Figure("rss_held_mib", "data-path RSS, idle connections held", "MiB", False, vs_direct=False, digits=1),
    Figure("cpu_s_per_gb", "CPU s/GB, whole path (generators + data path)", "s/GB", False),
    Figure("datapath_cpu_s_per_gb", "CPU s/GB, data-path processes only", "s/GB", False, vs_direct=False),
    Figure("datapath_cpu_ms_per_conn", "data-path CPU per new connection", "ms", False, vs_direct=False),
)
FIGURE_BY_KEY = {f.key: f for f in FIGURES}
# The ping-pong tests and the prefix of their figures: as the scheduler places the processes, and in the two
# fixed CPU layouts of bench/placement.py (why: docs/performance-latency.md, "Where the processes run").
RR_TESTS = {"rr": ("rr", "free"), "rr_1cpu": ("rr1cpu", "1cpu"), "rr_nodes": ("rrnodes", "nodes")}


def summarize(values: Sequence[float]) -> dict | None:
    """Median, min, max and n of the samples, or None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summaries(samples: Mapping[str, Mapping[str, Sequence[float]]],
              figures: Sequence[Figure] = FIGURES) -> dict[str, dict[str, dict | None]]:
    """path → figure → summary, for every figure of ``figures``."""
    return {path: {f.key: summarize(per_figure.get(f.key, ())) for f in figures} for path, per_figure in samples.items()}


def best_peer(summary: Mapping[str, Mapping[str, dict | None]], figure: Figure, peers: Iterable[str]) -> str | None:
    """The peer with the best median of ``figure`` (highest or lowest, as the figure says)."""
    candidates = [(summary[p][figure.key]["median"], p) for p in peers
                  if p in summary and summary[p].get(figure.key)]
    if not candidates:
        return None
    return (max if figure.higher_is_better else min)(candidates)[1]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(summary: Mapping[str, Mapping[str, dict | None]], peers: Sequence[str],
           direct: str = "direct", figures: Sequence[Figure] = FIGURES) -> dict[str, dict[str, dict]]:
    """path → figure → {vs_direct, vs_best_peer, best_peer}: ratios of medians (None where meaningless)."""
    out: dict[str, dict[str, dict]] = {}
    for path, per_figure in summary.items():
        out[path] = {}
        for figure in figures:
            mine = (per_figure.get(figure.key) or {}).get("median")
            base = (summary.get(direct, {}).get(figure.key) or {}).get("median") if figure.vs_direct else None
            peer = best_peer(summary, figure, peers)
            peer_median = summary[peer][figure.key]["median"] if peer else None
            out[path][figure.key] = {"vs_direct": _ratio(mine, base), "vs_best_peer": _ratio(mine, peer_median),
                                     "best_peer": peer}
    return out


# ------------------------------------------------------------------------------------------ targets

@dataclass(frozen=True)
class Target:
    key: str
    text: str
    figure: str
    kind: str          # "ratio_min": tcpmesh / best peer >= limit; "ratio_max": <= limit; "abs_max": value <= limit
    limit: float


TARGETS: tuple[Target, ...] = (
    Target("bulk1", "bulk, 1 stream ≥ 1.2 × best peer", "bulk1_gbps", "ratio_min", 1.2),
    Target("bulk8", "bulk, 8 streams ≥ 1.2 × best peer", "bulk8_gbps", "ratio_min", 1.2),
    Target("latency", "added p50 latency ≤ 1.5 × best peer's", "rr_added_p50_us", "ratio_max", 1.5),
    Target("latency_1cpu", "added p50 latency, every process on one CPU ≤ 1.5 × best peer's", "rr1cpu_added_p50_us",
           "ratio_max", 1.5),
    Target("latency_nodes", "added p50 latency, each node on its own CPU ≤ 1.5 × best peer's",
           "rrnodes_added_p50_us", "ratio_max", 1.5),
    Target("connrate", "new connections/s ≥ 2 × best peer", "crr_per_s", "ratio_min", 2.0),
    Target("memory", "RSS with 1,000 idle connections ≤ 100 MiB, both nodes", "rss_held_mib", "abs_max", 100.0),
    Target("capture", "eBPF capture adds ≤ 5 % to connection setup", "capture_overhead_pct", "abs_max", 5.0),
)


def check_targets(summary: Mapping[str, Mapping[str, dict | None]], ratio_table: Mapping[str, Mapping[str, dict]],
                  capture: Mapping | None, held_connections: int, subject: str = "tcpmesh") -> list[dict]:
    """Each target of issue #8 with tcpmesh's value and whether this run met it (None: not measured)."""
    results = []
    for target in TARGETS:
        value: float | None
        note = ""
        if target.figure == "capture_overhead_pct":
            value = (capture or {}).get("overhead_pct", {}).get("median") if capture else None
        elif target.kind == "abs_max":
            value = ((summary.get(subject) or {}).get(target.figure) or {}).get("median")
            if target.key == "memory" and held_connections != 1000:
                note = f"measured with {held_connections} connections, not 1,000"
        else:
            value = ((ratio_table.get(subject) or {}).get(target.figure) or {}).get("vs_best_peer")
        if value is None:
            met = None
        elif target.kind == "ratio_min":
            met = value >= target.limit
        else:
            met = value <= target.limit
        results.append({"key": target.key, "text": target.text, "value": value, "limit": target.limit,
                        "kind": target.kind, "met": met, "note": note})
    return results


# ------------------------------------------------------------------------------------------ derive

def derive(raw: Mapping[str, Mapping], direct_raw: Mapping[str, Mapping] | None, has_datapath: bool) -> dict[str, float]:
    """The figures of one path in one repetition from its raw results (tests that failed are absent);
    ``direct_raw`` is the direct path's raw results of the same repetition (added latency), if any."""
    out: dict[str, float] = {}
    if "bulk1" in raw:
        out["bulk1_gbps"] = raw["bulk1"]["gbps"]
    if "bulk8" in raw:
        out["bulk8_gbps"] = raw["bulk8"]["gbps"]
    for test, (prefix, _) in RR_TESTS.items():
        if test not in raw:
            continue
        out[f"{prefix}_p50_us"] = raw[test]["rtt_us"]["p50"]
        direct = (direct_raw or {}).get(test)
        if direct is not None:
            out[f"{prefix}_added_p50_us"] = out[f"{prefix}_p50_us"] - direct["rtt_us"]["p50"]
    if "rr" in raw:
        out["rr_p99_us"] = raw["rr"]["rtt_us"]["p99"]
    if "loadmax" in raw:
        out["load_max_per_s"] = raw["loadmax"]["per_second"]
    if "loadhalf" in raw:
        out["load_p50_us"] = raw["loadhalf"]["rtt_us"]["p50"]
        out["load_p99_us"] = raw["loadhalf"]["rtt_us"]["p99"]
    if "crr" in raw:
        out["crr_per_s"] = raw["crr"]["per_second"]
        out["crr_p50_ms"] = raw["crr"]["latency_us"]["p50"] / 1000
        if has_datapath and raw["crr"].get("completed_all"):
            out["datapath_cpu_ms_per_conn"] = raw["crr"]["datapath_cpu_s"] * 1000 / raw["crr"]["completed_all"]
    if has_datapath and "idle" in raw:
        out["rss_idle_mib"] = raw["idle"]["rss_kib"] / 1024
    if has_datapath and "hold" in raw:
        out["rss_held_mib"] = raw["hold"]["memory"]["rss_kib"] / 1024
    bulks = [raw[k] for k in ("bulk1", "bulk8") if k in raw]
    gigabytes = sum(b["bytes"] for b in bulks) / 1e9
    if gigabytes > 0:
        datapath_cpu = sum(b["datapath_cpu_s"] for b in bulks)
        out["cpu_s_per_gb"] = (datapath_cpu + sum(b["generator_cpu_s"] for b in bulks)) / gigabytes
        if has_datapath:
            out["datapath_cpu_s_per_gb"] = datapath_cpu / gigabytes
    return out


def half_rate(rep: Mapping[str, Mapping], direct: str = "direct") -> float | None:
    """The offered load of the latency-under-load test in one repetition: half the lowest closed-loop
    rate any tunnel reached (``loadmax``), so every path carries the same load and none is past half
    its capacity; None when no tunnel was measured."""
    rates = [tests["loadmax"]["per_second"] for path, tests in rep.items()
             if path != direct and "loadmax" in tests and tests["loadmax"]["per_second"] > 0]
    return min(rates) / 2 if rates else None


# ------------------------------------------------------------------------------------------ same node

SAME_NODE_TESTS = ("rr", "rr_1cpu", "bulk1", "bulk8")  # on one node, one CPU is also that node's layout
SAME_NODE_TARGETS = (  # issue #19: (key, text, figure, kind, limit); kind as Target's
    ("same_node_bulk1", "same-node bulk, 1 stream ≥ 0.8 × direct", "bulk1_gbps", "ratio_min", 0.8),
    ("same_node_bulk8", "same-node bulk, 8 streams ≥ 0.8 × direct", "bulk8_gbps", "ratio_min", 0.8),
    ("same_node_latency", "same-node added p50 ≤ 10 µs", "rr_added_p50_us", "abs_max", 10.0),
)


def same_node(raw: Sequence[Mapping[str, Mapping]]) -> dict:
    """The same-node scenario's figures: ``raw`` holds one {"direct": tests, "tcpmesh": tests} per
    repetition. Returns summaries per path, tcpmesh's ratios to direct (same repetitions) and the targets."""
    samples: dict[str, dict[str, list[float]]] = {"direct": {}, "tcpmesh": {}}
    for rep in raw:
        for path in samples:
            for key, value in derive(rep.get(path) or {}, rep.get("direct"), has_datapath=path != "direct").items():
                samples[path].setdefault(key, []).append(value)
    summary = summaries(samples)
    ratio = {}
    for figure in FIGURES:
        mine = (summary["tcpmesh"].get(figure.key) or {}).get("median")
        base = (summary["direct"].get(figure.key) or {}).get("median") if figure.vs_direct else None
        ratio[figure.key] = _ratio(mine, base)
    targets = []
    for key, text, figure, kind, limit in SAME_NODE_TARGETS:
        value = ratio.get(figure) if kind == "ratio_min" else (summary["tcpmesh"].get(figure) or {}).get("median")
        met = None if value is None else (value >= limit if kind == "ratio_min" else value <= limit)
        targets.append({"key": key, "text": text, "value": value, "limit": limit, "kind": kind, "met": met, "note": ""})
    return {"samples": samples, "summary": summary, "vs_direct": ratio, "targets": targets}

