"""Taking a lab's cgroups down (agent/lab/cgroups.py ``remove_tree``) on real cgroups, under the per-test cgroup.

A process that is still leaving its cgroup when the lab is taken down (the lab's own agent, SIGKILLed a
moment before, on a loaded machine) must not make ``lab down`` report its cgroup as holding "processes the
lab did not start". Seen failing before the change: a cgroup whose only process exits 1 s after
``remove_tree`` starts was reported busy (helpers' runs at load 8-11 hit it in test_interrupted_run and the
kernel TLS bench's lab teardown).
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from agent.lab.cgroups import remove_tree


def process_in(cgroup: Path, seconds: float) -> subprocess.Popen:
    """``sleep seconds`` in ``cgroup``, reaped by a thread as soon as it exits (a zombie is not the case here)."""
    proc = subprocess.Popen(["sleep", str(seconds)],
                            preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"))
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def test_a_process_that_leaves_within_the_bound_does_not_make_the_cgroup_busy(test_cgroup):
    tree = test_cgroup / "lab" / "node2" / "agent"
    tree.mkdir(parents=True)
    proc = process_in(tree, 1.0)
    assert str(proc.pid) in (tree / "cgroup.procs").read_text().split()
    assert remove_tree(str(test_cgroup / "lab"), exit_seconds=10.0) == []
    assert not (test_cgroup / "lab").exists()


def test_a_process_that_stays_is_reported_with_its_pid_after_the_bound(test_cgroup):
    tree = test_cgroup / "lab" / "node2" / "agent"
    tree.mkdir(parents=True)
    proc = process_in(tree, 60.0)
    try:
        busy = remove_tree(str(test_cgroup / "lab"), exit_seconds=0.5)
        assert [(b.path, tuple(b.pids)) for b in busy] == [(str(tree), (proc.pid,))]
        assert tree.is_dir()
    finally:
        proc.kill()
