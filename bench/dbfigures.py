"""The database scenario's figures, their ratios, and issue #19's targets for it.

Pure: the raw results of bench/databases.py in, JSON-ready dicts out; no I/O (imports only
bench.figures and agent/lab/realservers.py's geometric mean). Raw results are, per
path, one dict per repetition: ``{"pgbench": {...}, "redis": {"<clients>": {...}, ...}}`` (a test
that failed is absent). Medians, min–max and ratios of medians are bench/figures.py's, as for every
other figure of the run.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from agent.lab.realservers import geometric_mean
from bench.figures import Figure, ratios, summaries

REDIS_TESTS = ("SET", "GET")
TARGET_RATIO = 0.6  # issue #19: pgbench and redis-benchmark through the mesh >= 0.6 x direct


def figure_list(pgbench_clients: int, redis_clients: Sequence[int]) -> tuple[Figure, ...]:
    figures = [
        Figure("pgbench_tps", f"pgbench TPC-B, {pgbench_clients} clients", "tps", True, digits=0),
        Figure("pgbench_latency_ms", "pgbench average transaction latency", "ms", False),
        Figure("pgbench_cpu_ms_per_tx", "CPU per pgbench transaction, client + server + data path", "ms", False,
               digits=3),
        Figure("pgbench_datapath_ms_per_tx", "data-path CPU per pgbench transaction", "ms", False, vs_direct=False,
               digits=3),
    ]
    for clients in redis_clients:
        for test in REDIS_TESTS:
            figures.append(Figure(redis_key(test, clients), f"redis-benchmark {test}, {clients} clients", "req/s",
                                  True, digits=0))
    return tuple(figures)


def redis_key(test: str, clients: int) -> str:
    return f"redis_{test.lower()}_c{clients}"


def derive(raw: Mapping[str, Mapping], has_datapath: bool) -> dict[str, float]:
    """The figures of one path in one repetition."""
    out: dict[str, float] = {}
    pg = raw.get("pgbench")
    if pg:
        out["pgbench_tps"] = pg["tps"]
        if pg.get("latency_ms") is not None:
            out["pgbench_latency_ms"] = pg["latency_ms"]
        if pg.get("processed"):
            cpu = pg["client_cpu_s"] + pg["server_cpu_s"] + (pg["datapath_cpu_s"] if has_datapath else 0.0)
            out["pgbench_cpu_ms_per_tx"] = cpu * 1000 / pg["processed"]
            if has_datapath:
                out["pgbench_datapath_ms_per_tx"] = pg["datapath_cpu_s"] * 1000 / pg["processed"]
    for run in (raw.get("redis") or {}).values():
        for test, rps in run["rps"].items():
            out[redis_key(test, run["clients"])] = rps
    return out


def analyse(raw: Mapping[str, Sequence[Mapping]], paths: Sequence[str], peers: Sequence[str],
            pgbench_clients: int, redis_clients: Sequence[int], subject: str = "tcpmesh") -> dict:
    """Samples, summaries, ratios, each path's geometric mean of its Redis ratios to direct, and the targets."""
    figures = figure_list(pgbench_clients, redis_clients)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    for path in paths:
        for rep in raw.get(path, []):
            for key, value in derive(rep, has_datapath=path != "direct").items():
                samples[path].setdefault(key, []).append(value)
    summary = summaries(samples, figures)
    ratio = ratios(summary, peers, figures=figures)
    redis_keys = [f.key for f in figures if f.key.startswith("redis_")]
    redis_geomean: dict[str, float | None] = {}
    for path in paths:
        values = [ratio[path][k]["vs_direct"] for k in redis_keys]
        complete = bool(values) and all(v is not None and v > 0 for v in values)
        redis_geomean[path] = geometric_mean(values) if complete else None
    pg_ratio = ratio.get(subject, {}).get("pgbench_tps", {}).get("vs_direct")
    clients = " and ".join(str(c) for c in redis_clients)
    targets = [
        _target("databases_pgbench", f"pgbench (TPC-B, {pgbench_clients} clients) ≥ {TARGET_RATIO} × direct", pg_ratio),
        _target("databases_redis", f"redis-benchmark (geometric mean of {' and '.join(REDIS_TESTS)} at {clients} "
                                   f"clients) ≥ {TARGET_RATIO} × direct", redis_geomean.get(subject)),
    ]
    return {"samples": samples, "summary": summary, "ratios": ratio, "redis_geomean_vs_direct": redis_geomean,
            "targets": targets}


def _target(key: str, text: str, value: float | None) -> dict:
    met = None if value is None else value >= TARGET_RATIO
    return {"key": key, "text": text, "value": value, "limit": TARGET_RATIO, "kind": "ratio_min", "met": met,
            "note": ""}
