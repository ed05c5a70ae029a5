"""Reaping labs whose owner is gone (agent/lab/owner.py, ``reap_orphaned_labs``), on real namespaces and cgroups.

A run cut by SIGKILL never takes its lab down. Here the owner is a real process the test SIGKILLs;
the next ``lab up`` must take that lab down completely (agents, pod processes, namespaces, cgroups,
state) and log which lab and why — and must leave alone a lab whose owner lives and one that has no
owner. Each test uses its own lab names and a state root under tmp_path.
Seen failing before the change: the killed owner's lab was still there after the next ``lab up``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import uuid

from agent.lab import agents
from agent.lab.lab import lab_down, lab_exec, lab_up, load_lab, reap_orphaned_labs
from agent.lab.topology import lab_bpffs_dir
from tests.lab.test_lab import FAKE_AGENT, lab_netns


def owner_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "600"])


def names(count: int) -> list[str]:
    return [f"r{uuid.uuid4().hex[:7]}{i}" for i in range(count)]


def alive(pid: int) -> bool:
    return agents.process_state(pid) not in (None, "Z", "X")


def gone_completely(name: str, state_root: str, cgroup: str, pids: list[int]) -> list[str]:
    left = [f"netns {ns}" for ns in lab_netns(name)]
    left += [f"state dir of {name}"] if os.path.exists(os.path.join(state_root, name)) else []
    left += [f"cgroup {cgroup}"] if os.path.isdir(cgroup) else []
    left += [f"bpffs {lab_bpffs_dir(name)}"] if os.path.isdir(lab_bpffs_dir(name)) else []
    left += [f"pid {pid}" for pid in pids if alive(pid)]
    return left


def test_the_next_lab_up_reaps_a_lab_whose_owner_was_killed_and_only_that(privileged, cgroup2_mount, tmp_path, caplog):
    state_root = str(tmp_path / "labs")
    dead, living, ownerless, fresh = names(4)
    owners = {dead: owner_process(), living: owner_process()}
    pod_app = None
    try:
        plan = lab_up(dead, 2, 1, agents_enabled=True, agent_argv=FAKE_AGENT + ["run"], state_root=state_root,
                      ready_timeout=30, identity="node_ca", owner_pid=owners[dead].pid)
        _, state = load_lab(dead, state_root)
        agent_pids = [r["pid"] for r in state["agents"].values()]
        pod_app = lab_exec(dead, "n1p1", ["sleep", "600"], state_root=state_root)  # what a test leaves in a pod
        lab_up(living, 1, 1, agents_enabled=False, state_root=state_root, owner_pid=owners[living].pid)
        lab_up(ownerless, 1, 1, agents_enabled=False, state_root=state_root, owner_pid=None)

        owners[dead].send_signal(signal.SIGKILL)
        owners[dead].wait()
        assert lab_netns(dead) and all(alive(p) for p in agent_pids)   # what a killed run leaves behind

        with caplog.at_level(logging.WARNING, logger="agent.lab.lab"):
            lab_up(fresh, 1, 1, agents_enabled=False, state_root=state_root)   # owned by this process

        assert gone_completely(dead, state_root, plan.cgroup, agent_pids + [pod_app.pid]) == []
        assert pod_app.wait(timeout=5) == -signal.SIGKILL
        said = caplog.text
        assert f"reaping lab {dead!r}" in said and f"pid {owners[dead].pid}" in said and "is gone" in said, said
        for kept in (living, ownerless, fresh):
            assert load_lab(kept, state_root) and lab_netns(kept), kept
            assert repr(kept) not in said
    finally:
        if pod_app is not None and pod_app.poll() is None:
            pod_app.kill()
            pod_app.wait()
        for proc in owners.values():
            proc.kill()
            proc.wait()
        for name in (dead, living, ownerless, fresh):
            lab_down(name, state_root=state_root)


def test_a_reused_owner_pid_is_not_mistaken_for_life(privileged, cgroup2_mount, tmp_path):
    """The owner's PID now names another process (here: this one, with the start time of another)."""
    state_root = str(tmp_path / "labs")
    (name,) = names(1)
    try:
        plan = lab_up(name, 1, 1, agents_enabled=False, state_root=state_root)
        state = json.loads(open(plan.state_file).read())
        assert state["owner"]["pid"] == os.getpid()
        assert reap_orphaned_labs(state_root) == []   # its owner (this process) lives
        state["owner"]["starttime"] -= 1
        with open(plan.state_file, "w") as f:
            json.dump(state, f)
        reaped = reap_orphaned_labs(state_root)
        assert [r["name"] for r in reaped] == [name] and "now belongs to a process started at" in reaped[0]["reason"]
        assert gone_completely(name, state_root, plan.cgroup, []) == []
    finally:
        lab_down(name, state_root=state_root)


def test_lab_up_refuses_an_owner_pid_that_is_not_running(privileged, cgroup2_mount, tmp_path):
    from click.testing import CliRunner

    from agent.lab.cli import lab as lab_cli

    (name,) = names(1)
    gone = subprocess.Popen(["true"])
    gone.wait()
    for value, said in ((str(gone.pid), f"lab owner pid {gone.pid} is not a running process"),
                        ("me", "TCPMESH_LAB_OWNER_PID='me' is not a PID")):
        result = CliRunner().invoke(lab_cli, ["up", "--name", name, "--no-agents", "--state-root",
                                              str(tmp_path / "labs")], env={"TCPMESH_LAB_OWNER_PID": value})
        assert result.exit_code != 0 and said in str(result.exception), (result.output, result.exception)
        assert not lab_netns(name)
