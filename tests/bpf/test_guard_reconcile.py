"""A restart that turns the node guard off (``capture.pods_cgroup: ""``) or moves it finds the guard the
previous run left attached and keeps it, on our set, and says so: the kernel and the log agree.

What a restarted agent builds is a ConnectMode; the kernel is asked directly (tests/bpf/attached.py,
BPF_PROG_QUERY) which programs sit on the old pods cgroup.
"""

from __future__ import annotations

import logging

import pytest

from agent.capture.connect_mode import ROLE_GUARD, detach_leftovers, hooks_for
from agent.capture.modes import ConnectMode
from tests.bpf.attached import cgroup_programs
from tests.bpf.bpfworld import NODE_IP, REDIRECT_PORT

GUARD_PROGRAMS = {h.program for h in hooks_for(ROLE_GUARD)}


def guard_on(path) -> set[str]:
    return {name for _attach, _id, name in cgroup_programs(path) if name in GUARD_PROGRAMS}


@pytest.fixture
def restart(bpffs_dir, cgroups, test_cgroup, tmp_path):
    """start(pods_cgroup) runs one agent start (then stop) the way the agent builds its capture."""
    def start(pods_cgroup: str) -> None:
        mode = ConnectMode(NODE_IP, REDIRECT_PORT, str(tmp_path), str(cgroups["proxy"]), pods_cgroup,
                           str(bpffs_dir), guard_scope=str(test_cgroup))
        try:
            mode.start()
        finally:
            mode.stop()
    try:
        yield start
    finally:
        for path in cgroups.values():
            detach_leftovers(path)


def test_restart_with_the_guard_off_keeps_the_old_guard_and_says_so(restart, cgroups, caplog):
    restart(str(cgroups["pods"]))
    assert guard_on(cgroups["pods"]) == GUARD_PROGRAMS
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tcpmesh.capture"):
        restart("")
    assert guard_on(cgroups["pods"]) == GUARD_PROGRAMS  # fail closed: still guarded ...
    text = caplog.text
    assert "guard off" not in text, text                 # ... and the log does not say otherwise
    assert f"kept the guard a previous run attached to {cgroups['pods']}" in text, text
    assert "tcpmesh cleanup" in text, text               # and how to remove it


def test_restart_with_the_guard_moved_keeps_both(restart, cgroups, caplog):
    restart(str(cgroups["pods"]))
    with caplog.at_level(logging.INFO, logger="tcpmesh.capture"):
        restart(str(cgroups["pod_a"]))
    assert guard_on(cgroups["pods"]) == GUARD_PROGRAMS
    assert guard_on(cgroups["pod_a"]) == GUARD_PROGRAMS
    assert f"guard on {cgroups['pod_a']}" in caplog.text
    assert f"kept the guard a previous run attached to {cgroups['pods']}" in caplog.text
