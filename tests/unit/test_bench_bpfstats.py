"""bench.bpfstats.programs: the tcpmesh programs effective on some cgroups, read with `bpftool -j cgroup show`.

Seen failing before: for a cgroup with no program bpftool prints an empty line (exit 0) and ``programs``
raised JSONDecodeError ("Expecting value: line 2 column 1"), so bench/wakeups.py parsed bpftool's output itself.
The real bpftool on a real empty cgroup: tests/bpf/test_bpfstats_cgroup.py.
"""

from __future__ import annotations

import os
import stat

import pytest

from bench import bpfstats


def _fake_bpftool(tmp_path, monkeypatch, stdout: str, code: int = 0) -> None:
    script = tmp_path / "bin" / "bpftool"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("stdout", ["\n", "", "[]\n", "null\n"])
def test_a_cgroup_with_no_program_has_none(tmp_path, monkeypatch, stdout):
    _fake_bpftool(tmp_path, monkeypatch, stdout)
    assert bpfstats.programs(["/sys/fs/cgroup/some/pod"]) == {}


def test_tcpmesh_programs_are_listed_and_others_left_out(tmp_path, monkeypatch):
    _fake_bpftool(tmp_path, monkeypatch, '[{"id": 7, "name": "tcpmesh_conn4"}, {"id": 9, "name": "sd_devices"}]\n')
    assert bpfstats.programs(["/sys/fs/cgroup/some/pod"]) == {7: "tcpmesh_conn4"}


def test_a_cgroup_bpftool_cannot_open_is_an_error_naming_it(tmp_path, monkeypatch):
    _fake_bpftool(tmp_path, monkeypatch, '{"error":"cannot open cgroup /nope"}', code=255)
    with pytest.raises(RuntimeError, match="cannot open cgroup /nope"):
        bpfstats.programs(["/nope"])

