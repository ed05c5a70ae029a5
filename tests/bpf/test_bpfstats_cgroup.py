"""bench.bpfstats.programs with the real bpftool: a cgroup without programs has none (bpftool prints an empty
line for it; that raised JSONDecodeError before), and bench/wakeups.py reads cgroups through it."""

from __future__ import annotations

from bench import bpfstats
from tests.conftest import require_binary


def test_a_real_empty_cgroup_has_no_program(test_cgroup):
    require_binary("bpftool", "bpftool")
    assert bpfstats.programs([str(test_cgroup)]) == {}
