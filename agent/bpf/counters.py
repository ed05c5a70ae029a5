"""Summing a program's per-CPU reason counters (tcpmesh_counters, tcpmesh_stats_counters, ...). Pure.

A scrape either reports every reason or nothing: a partial read (a reason missing, a CPU slot
unreadable) returns None so the caller emits nothing rather than a counter that goes backwards.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def sum_per_cpu(per_reason: Mapping[int, Sequence[int] | None],
                names: Sequence[str]) -> dict[str, int] | None:
    """{reason code: per-CPU values} -> {reason name: total}, or None on a partial read.

    ``names``: the reason names in code order (a program's reason table, e.g. capture's abi.REASONS)."""
    totals: dict[str, int] = {}
    for code, name in enumerate(names):
        values = per_reason.get(code)
        if values is None or len(values) == 0:
            return None
        totals[name] = sum(int(v) for v in values)
    return totals
