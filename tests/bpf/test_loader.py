"""agent.bpf.loader: the one request/answer protocol with the loader child, against the real kernel.

Fds come back for every loaded program and belong to the caller; with ``probe=True`` a program the
child cannot load is a row in ``failed`` while the others load; without it the same failure is a
BpfLoadError naming the program, rebuilt in this process; a child that does not answer in time is
killed and reported as LoaderFailed.
"""

from __future__ import annotations

import os

import pytest

from agent.bpf import sources
from agent.bpf.errors import BpfLoadError, LoaderFailed
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import LoadRequest, Program, load

SCHED_CLS = 3


def probe_request(state_dir, *programs: Program, probe: bool = False) -> LoadRequest:
    source_dir = sources.bpf_dir()
    return LoadRequest(str(source_dir / "probe.c"), tuple(sources.base_cflags(source_dir)), str(state_dir),
                       programs, probe=probe)


def test_program_fds_come_back_and_belong_to_the_caller(bpf_capable, tmp_path):
    loaded = load(probe_request(tmp_path, Program("probe_sched_cls", SCHED_CLS)))
    with loaded:
        assert loaded.compiled and loaded.failed == {} and loaded.max_rss_kb > 0
        fd = loaded.programs["probe_sched_cls"]
        prog_id, name = Libbpf().prog_info(fd)
        assert prog_id > 0 and name == "probe_sched_cls"
    assert loaded.programs == {}
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the context


def test_probe_reports_a_program_that_cannot_load_and_loads_the_rest(bpf_capable, tmp_path):
    with load(probe_request(tmp_path, Program("probe_sched_cls", SCHED_CLS), Program("no_such_program", SCHED_CLS),
                            probe=True)) as loaded:
        assert list(loaded.programs) == ["probe_sched_cls"]
        assert list(loaded.failed) == ["no_such_program"]
        assert "BPF load of program no_such_program" in loaded.failed["no_such_program"]


def test_without_probe_the_same_failure_is_a_typed_error_naming_the_program(bpf_capable, tmp_path):
    with pytest.raises(BpfLoadError) as info:
        load(probe_request(tmp_path, Program("probe_sched_cls", SCHED_CLS), Program("no_such_program", SCHED_CLS)))
    assert info.value.stage == "load" and info.value.program == "no_such_program"


def test_a_child_that_does_not_answer_in_time_is_killed_and_reported(bpf_capable, tmp_path):
    with pytest.raises(LoaderFailed, match="did not finish within"):
        load(probe_request(tmp_path, Program("probe_sched_cls", SCHED_CLS)), timeout=0.05)
