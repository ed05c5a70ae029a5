"""An interrupted e2e run leaves nothing behind (tests/conftest.py InterruptTeardown, agent/lab/owner.py).

Each case starts pytest on tests/e2e/interrupt_target.py (a real lab: two agents, two issuer replicas,
an echo server in a pod, and a test blocked on that server), waits until the lab is up, then:
SIGINT — sent to a run that inherited SIGINT ignored, as a background job of a non-interactive shell
does (before: the run ignored it and went on); SIGTERM (before: the run died at once and left the whole
lab); SIGKILL — nothing can run, so the next reap (what `lab up` and this tier's session start do)
must remove the lab. In every case, within ``BOUND`` seconds: no netns, no state dir, no cgroup, no
pinned BPF, no agent, issuer or pod process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.lab import agents
from agent.lab import lab as labops
from agent.lab.topology import DEFAULT_STATE_ROOT, lab_bpffs_dir, lab_cgroup
from tests.conftest import TIME_SCALE
from tests.e2e.interrupt_target import READY_ENV

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests/e2e/interrupt_target.py"
BOUND = 30.0 * TIME_SCALE
UP_TIMEOUT = 120.0 * TIME_SCALE


def leftovers(name: str, cgroup: str, pids: list[int]) -> list[str]:
    left = [f"netns {ns}" for ns in os.listdir("/run/netns") if ns.startswith(f"tcpmesh-{name}-")] \
        if os.path.isdir("/run/netns") else []
    left += [f"state dir {DEFAULT_STATE_ROOT}/{name}"] if os.path.exists(f"{DEFAULT_STATE_ROOT}/{name}") else []
    left += [f"cgroup {cgroup}"] if os.path.isdir(cgroup) else []
    left += [f"pinned BPF {lab_bpffs_dir(name)}"] if os.path.isdir(lab_bpffs_dir(name)) else []
    left += [f"pid {pid}" for pid in pids if agents.process_state(pid) not in (None, "Z", "X")]
    return left


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_an_interrupted_run_leaves_no_lab_behind(bpf_capable, tmp_path, signum):
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TARGET], cwd=REPO,
                           env={**os.environ, READY_ENV: str(ready)}, stdout=log, stderr=subprocess.STDOUT,
                           preexec_fn=ignore_sigint if signum == signal.SIGINT else None)
    name = None
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        while not ready.exists():
            assert run.poll() is None, f"the run ended before its lab was up:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the lab was not up in time"
            time.sleep(0.2)
        started = json.loads(ready.read_text())
        name = started["lab"]
        _, state = labops.load_lab(name)
        pids = [started["app_pid"]] + [r["pid"] for r in [*state["agents"].values(), *state["issuers"].values()]]
        cgroup = lab_cgroup(state["inputs"]["cgroup_root"], name)
        assert len(pids) == 5 and len(leftovers(name, cgroup, pids)) > 5, "the lab is not up"

        sent = time.monotonic()
        run.send_signal(signum)
        try:
            code = run.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run was still going {BOUND:.0f}s after {signum.name}:\n"
                        f"{Path(log.name).read_text()[-3000:]}")
        if signum == signal.SIGKILL:
            assert leftovers(name, cgroup, pids), "SIGKILL left nothing to reap?"
            reaped = labops.reap_orphaned_labs()
            assert [r["name"] for r in reaped if r["name"] == name] == [name], reaped
            assert "is gone (no such process)" in next(r for r in reaped if r["name"] == name)["reason"]
        else:
            assert code == pytest.ExitCode.INTERRUPTED, Path(log.name).read_text()[-3000:]
        deadline = sent + BOUND
        while leftovers(name, cgroup, pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers(name, cgroup, pids) == [], Path(log.name).read_text()[-3000:]
        print(f"{signum.name}: lab {name} gone {time.monotonic() - sent:.1f}s after the signal")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        log.close()
        if name is not None:
            labops.lab_down(name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_an_interrupted_demo_removes_its_lab_even_while_building_it(bpf_capable, tmp_path, signum):
    """`tcpmesh demo` builds its lab in-process and removes it at the end; a SIGTERM or SIGHUP while the agents
    start (the lab half built) must remove it too, within ``BOUND``. Seen failing before agent/lab/interrupt.py:
    the demo died at once and left the namespaces, cgroups, state dir and both agents (to the next `lab up`)."""
    from agent.demo.run import DEMO_LAB

    assert not os.path.exists(f"{DEFAULT_STATE_ROOT}/{DEMO_LAB}"), "a demo lab is up already"
    log = open(tmp_path / "demo.log", "w+")
    run = subprocess.Popen([sys.executable, "-m", "agent", "demo"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    pids: list[int] = []
    cgroup = ""
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        while not pids:   # the agents are being started: the lab is half built
            assert run.poll() is None, f"the demo ended early:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the demo's agents did not start in time"
            time.sleep(0.1)
            try:
                _, state = labops.load_lab(DEMO_LAB)
            except Exception:  # noqa: BLE001 — not written yet, or being rewritten
                continue
            pids = [r["pid"] for r in state.get("agents", {}).values()]
            cgroup = lab_cgroup(state["inputs"]["cgroup_root"], DEMO_LAB)
        sent = time.monotonic()
        run.send_signal(signum)
        try:
            run.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo was still going {BOUND:.0f}s after {signum.name}:\n"
                        f"{Path(log.name).read_text()[-3000:]}")
        assert leftovers(DEMO_LAB, cgroup, pids) == [], Path(log.name).read_text()[-3000:]
        print(f"{signum.name}: demo lab gone {time.monotonic() - sent:.1f}s after the signal")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        log.close()
        if os.path.exists(f"{DEFAULT_STATE_ROOT}/{DEMO_LAB}"):
            labops.lab_down(DEMO_LAB)
