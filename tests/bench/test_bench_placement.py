"""bench/placement.py: which CPU each role of a path gets, and that pinning is applied and undone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import figures, placement


def test_one_cpu_puts_every_role_on_the_first_allowed_cpu():
    roles = placement.assignments("1cpu", {3, 1}, datapath_groups=2)
    assert roles == {"client": 1, "server": 1, "datapath0": 1, "datapath1": 1}


def test_nodes_splits_node1_and_node2_between_two_cpus():
    assert placement.assignments("nodes", {0, 1}, 2) == {"client": 0, "datapath0": 0, "datapath1": 1, "server": 1}
    assert placement.assignments("nodes", {0, 1}, 0) == {"client": 0, "server": 1}   # the direct path


def test_free_pins_nothing_and_unknown_or_impossible_layouts_are_refused():
    assert placement.assignments("free", {0, 1}, 2) is None
    with pytest.raises(ValueError, match="unknown CPU layout 'two'"):
        placement.assignments("two", {0, 1}, 2)
    with pytest.raises(RuntimeError, match="needs two CPUs"):
        placement.assignments("nodes", {0}, 2)


def _allowed(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))


def test_placed_pins_the_servers_and_the_client_it_starts_then_restores_them():
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        before = _allowed(server.pid)
        with placement.placed("1cpu", [server.pid], [[]]):
            client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            assert _allowed(server.pid) == str(first)
            assert _allowed(client.pid) == str(first)
            client.kill()
            client.wait()
        assert _allowed(server.pid) == before
        assert os.sched_getaffinity(0) == allowed
    finally:
        server.kill()
        server.wait()


def test_added_latency_of_each_layout_is_against_the_direct_path_in_the_same_layout():
    mesh = {"rr": {"rtt_us": {"p50": 200.0, "p99": 400.0}}, "rr_1cpu": {"rtt_us": {"p50": 100.0, "p99": 0.0}},
            "rr_nodes": {"rtt_us": {"p50": 210.0, "p99": 0.0}}}
    direct = {"rr": {"rtt_us": {"p50": 80.0}}, "rr_1cpu": {"rtt_us": {"p50": 25.0}}, "rr_nodes": {"rtt_us": {"p50": 70.0}}}
    out = figures.derive(mesh, direct, has_datapath=True)
    assert (out["rr_added_p50_us"], out["rr1cpu_added_p50_us"], out["rrnodes_added_p50_us"]) == (120.0, 75.0, 140.0)
    assert "rr1cpu_added_p50_us" not in figures.derive(mesh, {"rr": {"rtt_us": {"p50": 80.0}}}, has_datapath=True)
