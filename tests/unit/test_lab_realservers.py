"""The parsers of agent/lab/realservers.py: what pgbench 15 and redis-benchmark 7 print, into numbers."""

from __future__ import annotations

import pytest

from agent.lab.realservers import geometric_mean, parse_pgbench, parse_redis_benchmark

PGBENCH = """pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 1
query mode: simple
number of clients: 8
number of threads: 1
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 4321
number of failed transactions: 0 (0.000%)
latency average = 9.257 ms
initial connection time = 20.123 ms
tps = 864.213579 (without initial connection time)
"""


def test_pgbench_summary():
    result = parse_pgbench(PGBENCH)
    assert (result.processed, result.failed, result.tps, result.latency_ms) == (4321, 0, 864.213579, 9.257)


def test_pgbench_without_a_summary_is_an_error_quoting_the_output():
    with pytest.raises(ValueError, match="connection to server .* failed"):
        parse_pgbench('pgbench: error: connection to server at "10.77.2.11", port 5432 failed: refused\n')


def test_redis_benchmark_quiet_output_with_progress_redraws_and_errors():
    output = ("SET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r"
              "SET: 41152.26 requests per second, p50=0.175 msec\n"
              "GET: 38610.04 requests per second, p50=0.183 msec\n"
              "Error from server: ERR unknown command\n")
    rates, errors = parse_redis_benchmark(output)
    assert rates == {"SET": 41152.26, "GET": 38610.04}
    assert errors == ["Error from server: ERR unknown command"]


def test_geometric_mean():
    assert geometric_mean([0.25, 1.0]) == pytest.approx(0.5)
