"""A program's per-CPU reason counters (tcpmesh_counters, tcpmesh_tc_counters, tcpmesh_stats_counters).

``sum_per_cpu`` is pure; ``read_reason_counters`` reads the map through libbpf and sums it. A scrape either reports every reason or nothing: a partial read (a reason missing, a CPU slot
unreadable) returns None so the caller emits nothing rather than a counter that goes backwards.
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

from agent.bpf.libbpf import Libbpf
from agent.errors import KernelError


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


def read_reason_counters(libbpf: Libbpf, map_fd: int, names: Sequence[str], target: str) -> dict[str, int] | None:
    """{reason name: total over CPUs} from a per-CPU array of u64 indexed by reason code, or None when
    any reason could not be read (a partial read). One lookup per reason (``len(names)``)."""
    cpus = libbpf.possible_cpus()
    per_reason: dict[int, list[int] | None] = {}
    for code in range(len(names)):
        try:
            raw = libbpf.map_lookup(map_fd, code.to_bytes(4, sys.byteorder, signed=True), 8 * cpus, target)
        except KernelError:
            raw = None
        per_reason[code] = None if raw is None else \
            [int.from_bytes(raw[i * 8:(i + 1) * 8], sys.byteorder) for i in range(cpus)]
    return sum_per_cpu(per_reason, names)
