"""Smoke test of the benchmark harness (bench/), not a benchmark: ``python -m bench --quick`` on tiny
sizes must build its world, produce figures for every path, the capture test and the database
scenario (real PostgreSQL and Redis), write its JSON and Markdown, and clean up after itself. Timings are never asserted (they depend on the machine
and on whatever else runs on it); ``make bench`` is where numbers come from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from agent.lab.realservers import missing_tools
from bench.dbfigures import figure_list
from bench.figures import FIGURES
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("stunnel", "haproxy", "iperf3", "sockperf", "cc")
TINY = ["--quick", "--reps", "1", "--bulk-seconds", "0.5", "--rr-seconds", "0.3", "--crr-seconds", "0.5",
        "--crr-warmup", "0.1", "--idle-connections", "20", "--capture-connects", "20", "--sockperf-seconds", "1",
        "--settle-seconds", "0.1", "--pgbench-seconds", "1", "--redis-requests", "500", "--no-record"]
DATAPATH_ONLY = {f.key for f in FIGURES if not f.vs_direct}
LIMIT_SECONDS = 150  # a generous bound for a busy shared machine; it takes well under a minute when idle


def _namespaces_of(lab: str) -> set[str]:
    """The network namespaces of one lab (other benches may run on the machine at the same time)."""
    return {n for n in os.listdir("/run/netns") if n.startswith(f"{lab}-")} if os.path.isdir("/run/netns") else set()


def test_quick_bench_produces_every_figure_for_every_path(bpf_capable, tmp_path):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"the benchmark needs {', '.join(missing)}: `make setup` installs them")
    if missing_tools():
        skip_or_fail(f"the benchmark's database scenario: {missing_tools()}")
    chart = [] if importlib.util.find_spec("matplotlib") else ["--no-chart"]
    proc = subprocess.Popen([sys.executable, "-m", "bench", *TINY, *chart, "--out-dir", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=LIMIT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench tears its lab down on the way out
        _, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"the quick bench did not finish within {LIMIT_SECONDS} s:\n{stderr[-3000:]}")
    found = list(tmp_path.glob("bench-*.json"))
    assert len(found) == 1, f"no results file; exit {proc.returncode}; stderr:\n{stderr[-3000:]}"
    results = json.loads(found[0].read_text())
    assert results["errors"] == [], results["errors"]
    assert proc.returncode == 0, stderr[-3000:]

    assert results["paths"] == ["direct", "tcpmesh", "stunnel", "haproxy"]
    for path in results["paths"]:
        for figure in FIGURES:
            if path == "direct" and figure.key in DATAPATH_ONLY:
                continue
            summary = results["summary"][path][figure.key]
            assert summary is not None and summary["n"] == 1, f"{path} has no {figure.key}"
        for ratio in ("vs_direct", "vs_best_peer"):
            assert results["ratios"][path]["bulk1_gbps"][ratio] is not None
        held = results["raw"][path][0]["hold"]
        assert held["held"] == 20 and held["failed"] == 0
    assert results["capture"]["overhead_pct"]["n"] == 1
    settings = results["settings"]
    for figure in figure_list(settings["pgbench_clients"], settings["redis_clients"]):
        for path in results["paths"]:
            if path == "direct" and not figure.vs_direct:
                continue
            assert results["databases"]["summary"][path][figure.key] is not None, f"{path} has no {figure.key}"
    assert {t["key"] for t in results["databases"]["targets"]} == {"databases_pgbench", "databases_redis"}
    assert all(t["value"] is not None for t in results["databases"]["targets"])
    assert results["reference"]["sockperf"]["p50"] > 0 and results["reference"]["loadgen"]["p50"] > 0
    assert {t["key"] for t in results["targets"]} == {"bulk1", "bulk8", "latency", "latency_1cpu",
                                                    "latency_nodes", "connrate", "memory", "capture"}
    for path in results["paths"]:
        assert {results["raw"][path][0][t]["layout"] for t in ("rr", "rr_1cpu", "rr_nodes")} == {"free", "1cpu", "nodes"}
    markdown = found[0].with_suffix(".md").read_text()
    assert "| figure | direct | tcpmesh | stunnel | haproxy |" in markdown
    assert "| pgbench TPC-B, 8 clients (tps) |" in markdown
    if chart == []:
        assert Path(results["chart"]).stat().st_size > 0
    lab = re.search(r"lab (\S+): up", stderr)
    assert lab, f"the bench did not name its lab; stderr:\n{stderr[-3000:]}"
    assert _namespaces_of(lab.group(1)) == set(), "the benchmark left its lab namespaces behind"
