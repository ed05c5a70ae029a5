"""bench/wakeups.py's pure parts: perf's per-cgroup CSV and the per-round-trip arithmetic."""

from __future__ import annotations

from bench.wakeups import parse_perf_csv, per_round_trip

CSV = """# started on Sun Dec  6 16:00:00 2026

1000;;raw_syscalls:sys_enter;tcpmesh-bench-x/client;2000000;100.00;;
5000;;raw_syscalls:sys_enter;tcpmesh-lab-x/node1/agent;2000000;100.00;;
<not counted>;;syscalls:sys_enter_epoll_ctl;tcpmesh-lab-x/node1/agent;0;100.00;;
1500;;syscalls:sys_enter_read;tcpmesh-lab-x/node1/agent;2000000;100.00;;
1500;;syscalls:sys_enter_write;tcpmesh-lab-x/node1/agent;2000000;100.00;;
1000;;syscalls:sys_enter_epoll_pwait;tcpmesh-lab-x/node1/agent;2000000;100.00;;
500;;syscalls:sys_enter_write;tcpmesh-bench-x/client;2000000;100.00;;
2000;;context-switches;tcpmesh-lab-x/node1/agent;2000000;100.00;;
7;;syscalls:sys_enter_write;someone-else;2000000;100.00;;
"""


def test_perf_csv_is_read_per_cgroup_with_syscall_names_and_not_counted_as_zero():
    counts = parse_perf_csv(CSV, {"tcpmesh-bench-x/client": "/cg/client",
                                  "tcpmesh-lab-x/node1/agent": "/cg/node1/agent"})
    assert set(counts) == {"/cg/client", "/cg/node1/agent"}
    assert counts["/cg/client"] == {"raw_syscalls:sys_enter": 1000.0, "write": 500.0}
    agent = counts["/cg/node1/agent"]
    assert agent["epoll_ctl"] == 0.0
    assert (agent["read"], agent["write"], agent["epoll_pwait"]) == (1500.0, 1500.0, 1000.0)
    assert agent["context-switches"] == 2000.0


def test_per_round_trip_divides_and_names_the_unlisted_system_calls():
    counts = parse_perf_csv(CSV, {"tcpmesh-lab-x/node1/agent": "agent"})["agent"]
    row = per_round_trip(counts, 500.0)
    assert (row["read"], row["write"], row["epoll_pwait"]) == (3.0, 3.0, 2.0)
    assert row["raw_syscalls:sys_enter"] == 10.0 and row["context-switches"] == 4.0
    assert row["other_syscalls"] == 2.0  # 5000 - 1500 - 1500 - 1000 calls of no listed kind
    assert "epoll_ctl" not in row  # zero counts are left out
