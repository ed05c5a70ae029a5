"""The docs run as written (issue #22): every command block of README.md, docs/lab.md and
docs/tutorial-postgres-redis.md, extracted from the Markdown itself, runs in one bash session per
page — as root, on a lab of its own, with real PostgreSQL and Redis for the tutorial — and each
```output block is checked against what its command block printed (convention: tests/docblocks.py).
A block that fails, hangs or prints something else fails the test with the page's line number.

Every page runs under ``TCPMESH_LAB=<a per-run name>``, so `tcpmesh lab` commands without `--name`
never touch another lab on the machine; a page that names its lab itself (the tutorial's
``export TCPMESH_LAB=…``) gets that one line rewritten (SUBSTITUTIONS, each checked to occur exactly
once, so the page and the test cannot drift apart silently).

Run time on the shared 2-core machine at load average 7-10: README 30-45 s, lab.md 35-50 s (two
labs: the Services example has its own), the tutorial 115-135 s (pgbench 5 s, redis-benchmark two
tests: the page says so); 3-3.5 min in all.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.host import checks
from agent.lab import lab as labops
from agent.lab.topology import DEFAULT_STATE_ROOT
from tests.conftest import require_binary, skip_or_fail
from tests.docblocks import EXECUTED_DOCS, command_blocks, missing_output, parse
from tests.e2e.doc_session import BlockRun, DocSession
from tests.e2e.real_workloads import missing_tools

REPO = Path(__file__).resolve().parents[2]
# Lines a page must contain exactly once, rewritten for the run ({lab}: the run's lab name).
SUBSTITUTIONS = {
    "docs/tutorial-postgres-redis.md": {"export TCPMESH_LAB=tutorial": "export TCPMESH_LAB={lab}"},
}
BLOCK_TIMEOUT = 120.0
NEEDS = {"docs/tutorial-postgres-redis.md": (("jq", "jq"), ("curl", "curl"))}  # (program, Debian package)


def page_blocks(doc: str, lab: str):
    text = (REPO / doc).read_text()
    for line, replacement in SUBSTITUTIONS.get(doc, {}).items():
        count = text.count(line)
        assert count == 1, f"{doc} must contain {line!r} exactly once (tests/e2e/test_docs_executed.py " \
                           f"rewrites it to run on a lab of its own); found {count}"
        text = text.replace(line, replacement.format(lab=lab))
    return command_blocks(parse(doc, text))


def describe(run: BlockRun) -> str:
    status = "still running (a hang?)" if run.returncode is None else f"exit {run.returncode}"
    if run.session_ended:
        status += " (set -e ended the session there)"
    return (f"{run.block.where}: {status} after {run.seconds:.1f}s\n--- block ---\n{run.block.text}"
            f"--- output ---\n{run.output[-3000:]}")


def kill_lab_processes(lab: str, timeout: float = 10.0) -> None:
    """SIGKILL what this page left running in its lab's pods (servers a failed run never stopped) and
    wait until they are gone, so `lab down` can remove the cgroups. Only the lab's own pods' cgroups
    are read: these are the page's processes; the agents (in the nodes' agent cgroups) are lab_down's."""
    base = Path(checks.find_cgroup2_mount() or "/nonexistent") / f"tcpmesh-lab-{lab}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(pid) for procs in base.glob("node*/pods/**/cgroup.procs") for pid in procs.read_text().split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@pytest.mark.parametrize("doc", EXECUTED_DOCS)
def test_every_command_block_of_the_page_runs_as_written(doc, bpf_capable, tmp_path):
    if doc.endswith("tutorial-postgres-redis.md"):
        problem = missing_tools()
        if problem:
            skip_or_fail(problem)
    for program, package in NEEDS.get(doc, ()):
        require_binary(program, package)
    lab = f"doc{uuid.uuid4().hex[:6]}"
    blocks = page_blocks(doc, lab)
    assert blocks, f"{doc} has no command block"
    env = {**os.environ, "TCPMESH_LAB": lab,
           "TCPMESH_LAB_ARCHIVE_DIR": str(tmp_path / "lab-archive")}  # the pages' `lab down` keeps logs there, not in /var/log
    env.pop("VIRTUAL_ENV", None)
    if sys.prefix != sys.base_prefix:  # the reader's PATH: the venv comes first only once the page activates it
        venv_bin = os.path.dirname(sys.executable)
        env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != venv_bin)
    session = DocSession(str(tmp_path), str(REPO), env)
    ran: list[BlockRun] = []
    try:
        for block in blocks:
            if block.not_run_reason is not None:
                continue
            run = session.run(block, BLOCK_TIMEOUT)
            ran.append(run)
            assert run.returncode is not None, describe(run)
            if block.must_fail:
                assert run.returncode != 0, f"this block should fail, as the page says; it did not:\n{describe(run)}"
            else:
                assert run.returncode == 0, describe(run)
            if block.expected is not None:
                missing = missing_output(block.expected.text, run.output)
                assert not missing, (f"{block.expected.where}: the page shows output its command did not print: "
                                     f"{missing}\n{describe(run)}")
    finally:
        session.close()
        kill_lab_processes(lab)
        labops.lab_down(lab)
        session.remove_files()
        timing = ", ".join(f"{r.block.line}: {r.seconds:.1f}s" for r in ran)
        print(f"{doc}: {len(ran)} blocks run (line: seconds) {timing}")
    assert not os.path.exists(f"{DEFAULT_STATE_ROOT}/{lab}"), f"{doc} left its lab's state dir behind"
