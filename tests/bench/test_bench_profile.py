"""bench.profile's pure parts: collapsed stacks to top functions, CPU per GB split user/kernel, the summary text."""

import os

from bench import profile


def test_summarize_counts_own_and_inclusive_samples():
    raw = ("process 1;main (a.py:1);relay (agent/proxy/relay.py:9);write (agent/proxy/endpoints.py:3) 6\n"
           "process 1;main (a.py:1);relay (agent/proxy/relay.py:9) 4\n")
    summary = profile.summarize(raw)
    assert summary["samples"] == 10
    assert summary["own"][0] == {"function": "write (agent/proxy/endpoints.py)", "samples": 6, "pct": 60.0}
    inclusive = {row["function"]: row["pct"] for row in summary["inclusive"]}
    assert inclusive["relay (agent/proxy/relay.py)"] == 100.0 and inclusive["write (agent/proxy/endpoints.py)"] == 60.0


def test_user_and_kernel_time_per_gigabyte():
    before = {"node1-7": (1.0, 2.0), "node2-8": (0.5, 0.5)}
    after = {"node1-7": (2.0, 2.5), "node2-8": (1.5, 2.5)}
    assert profile.user_system_per_gb(before, after, 2.0) == {
        "node1-7": {"user_s_per_gb": 0.5, "system_s_per_gb": 0.25},
        "node2-8": {"user_s_per_gb": 0.5, "system_s_per_gb": 1.0}}


def test_user_system_cpu_reads_this_process():
    (cost,) = profile.user_system_cpu([("self", os.getpid())]).values()
    assert cost[0] > 0 and cost[1] >= 0


def test_summary_names_the_split_and_leaves_out_frames_on_every_stack():
    result = {"rate": 250, "scenarios": {"bulk8": {
        "load": {"gbps": 5.0}, "threads": {},
        "user_system_per_gb": {"node1-7": {"user_s_per_gb": 0.5, "system_s_per_gb": 0.4}},
        "stacks": {"bulk8-node1-7.txt": {"samples": 10, "own": [{"function": "f (x.py)", "samples": 10, "pct": 100.0}],
                                         "inclusive": [{"function": "main (a.py)", "samples": 10, "pct": 100.0},
                                                       {"function": "g (y.py)", "samples": 5, "pct": 50.0}]}}}}}
    text = profile.render(result)
    assert "CPU per GB node1-7 (sampler running): user 0.5 s, kernel 0.4 s" in text
    assert "g (y.py)" in text and "main (a.py)" not in text
