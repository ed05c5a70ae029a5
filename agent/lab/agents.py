"""Start, watch and stop the lab's node agents.

An agent is started exactly as systemd does (``python -m agent run --config FILE``), inside its node's
netns and agent cgroup, in its own session, with stdout/stderr appended to a per-node log. What is
recorded for it is (pid, argv, starttime); ``stop_agents`` signals a PID only after
/proc/<pid>/cmdline and the start time in /proc/<pid>/stat still match the record, so a reused PID is
never hit. Readiness is ``GET http://<wire address>:15020/readyz`` → 200, made from inside the node netns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from agent.lab import nsenter
from agent.lab.errors import LabError
from agent.lab.topology import ADMIN_PORT, NodePlan

DEFAULT_AGENT_ARGV = (sys.executable, "-m", "agent", "run")
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0
READY_PATH = "/readyz"
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class AgentRecord:
    pid: int
    argv: tuple[str, ...]
    starttime: int

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "argv": list(self.argv), "starttime": self.starttime}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "AgentRecord":
        return cls(int(doc["pid"]), tuple(doc["argv"]), int(doc["starttime"]))


def agent_command(node: NodePlan, agent_argv: Sequence[str] | None = None) -> list[str]:
    return [*(agent_argv or DEFAULT_AGENT_ARGV), "--config", node.config_file]


def start_agent(node: NodePlan, agent_argv: Sequence[str] | None = None) -> tuple[subprocess.Popen, AgentRecord]:
    argv = agent_command(node, agent_argv)
    os.makedirs(os.path.dirname(node.log_file), exist_ok=True)
    with open(node.log_file, "ab") as log:
        proc = nsenter.popen_in(argv, netns=node.netns, cgroup=node.agent_cgroup, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=node.state_dir)
    starttime = process_starttime(proc.pid)
    if starttime is None:
        raise LabError(f"agent of {node.name} (pid {proc.pid}) vanished right after start; see {node.log_file}")
    return proc, AgentRecord(proc.pid, tuple(argv), starttime)


def ready_url(node: NodePlan) -> str:
    return f"http://{node.wire_address}:{ADMIN_PORT}{READY_PATH}"


def wait_ready(started: Mapping[str, tuple[NodePlan, subprocess.Popen]], timeout: float) -> None:
    """Wait until every agent answers 200 on /readyz; raise LabError naming the log of the first that fails."""
    pending = dict(started)
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while pending:
        for name, (node, proc) in list(pending.items()):
            code = proc.poll()
            if code is not None:
                raise LabError(f"the agent of {node.name} exited with code {code} before it was ready; "
                               f"its log is {node.log_file}:\n{log_tail(node.log_file)}")
            try:
                status, _ = nsenter.http_get_in_netns(node.netns, ready_url(node), timeout=1.0)
                last[name] = f"HTTP {status}"
                if status == 200:
                    del pending[name]
            except OSError as exc:
                last[name] = str(exc) or type(exc).__name__
        if not pending:
            return
        if time.monotonic() >= deadline:
            node = next(iter(pending.values()))[0]
            raise LabError(f"the agent of {node.name} was not ready after {timeout:.0f}s "
                           f"({ready_url(node)} from netns {node.netns}: {last.get(node.name, 'no answer')}); "
                           f"its log is {node.log_file}:\n{log_tail(node.log_file)}")
        time.sleep(0.2)


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-16384:].decode(errors="replace")
    except OSError:
        return "  (no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  (log is empty)"


def process_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None if the process is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z, ...), or None if the process is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def is_recorded_process(record: AgentRecord) -> bool:
    """True when ``record.pid`` is still the process lab up started (same argv, same start time, not a zombie)."""
    if process_state(record.pid) in (None, "Z", "X"):
        return False
    try:
        cmdline = open(f"/proc/{record.pid}/cmdline", "rb").read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    argv = tuple(part.decode(errors="replace") for part in cmdline.split(b"\0")[:-1])
    return argv == record.argv and process_starttime(record.pid) == record.starttime


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (lab up ran in another process): init reaps it


EXIT_SETTLE_SECONDS = 5.0


def stop_agents(records: Mapping[str, AgentRecord], timeout: float = DEFAULT_STOP_TIMEOUT) -> list[int]:
    """SIGTERM every recorded agent that is still the same process, wait, then SIGKILL. Returns PIDs signalled."""
    live = [r for r in records.values() if is_recorded_process(r)]
    for record in live:
        _signal(record.pid, signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, timeout), (None, 5.0)):
        deadline = time.monotonic() + wait
        while True:
            for record in live:
                _reap(record.pid)
            remaining = [r for r in live if is_recorded_process(r)]
            if not remaining or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if sig is None or not remaining:
            break
        for record in remaining:
            _signal(record.pid, sig)
    for record in live:
        _wait_gone(record.pid, EXIT_SETTLE_SECONDS)
    return [r.pid for r in live]


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait until ``pid`` has fully exited and been reaped.

    Its main thread shows as a zombie while other threads are still exiting, and an unreaped or
    half-exited process keeps its cgroup populated, so the cgroup's rmdir would fail with EBUSY.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return  # our child, reaped: the whole thread group is gone
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return  # not our child; init reaped it
        time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
