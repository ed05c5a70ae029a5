"""Per-CPU counter sums: every reason or nothing."""

from __future__ import annotations

from agent.capture import abi
from agent.bpf.counters import sum_per_cpu


def test_sums_every_reason_over_cpus():
    got = sum_per_cpu({code: [code, 1] for code in range(abi.REASON_MAX)}, abi.REASONS)
    assert got == {name: code + 1 for code, name in enumerate(abi.REASONS)}


def test_partial_read_emits_nothing():
    rows = {code: [1, 1] for code in range(abi.REASON_MAX)}
    rows[abi.REASON_CODES["origin_missing"]] = None
    assert sum_per_cpu(rows, abi.REASONS) is None
    del rows[abi.REASON_CODES["origin_missing"]]
    assert sum_per_cpu(rows, abi.REASONS) is None
    rows[abi.REASON_CODES["origin_missing"]] = []
    assert sum_per_cpu(rows, abi.REASONS) is None
