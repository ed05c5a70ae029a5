"""Who owns a lab, and which labs lost their owner.

A lab made in-process (a test session, the demo) records its *owner*: the process that will take it
down, as (pid, start time from /proc/<pid>/stat, argv). A run cut with SIGKILL never runs its
teardown, so its lab stays; the next ``lab up`` (and the e2e tier at session start) lists the state
dirs, and a lab whose recorded owner is gone — no such PID, a zombie, or the PID now belongs to a
process started at another time (a reused PID is not mistaken for life) — is an orphan to reap.
A lab with no owner (``tcpmesh lab up`` from a shell: the lab outlives the command) or whose owner is
alive is never touched. ``TCPMESH_LAB_OWNER_PID`` names the owner for ``tcpmesh lab up`` (a test
session that drives the CLI sets it to its own PID).

Reads /proc and state.json files only; it signals nothing and removes nothing (agent.lab.lab does,
with the same teardown as ``lab down``). Must not import agent.lab.lab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from agent.lab.agents import process_starttime, process_state
from agent.lab.errors import LabError

OWNER_ENV = "TCPMESH_LAB_OWNER_PID"


@dataclass(frozen=True)
class OwnerRecord:
    pid: int
    starttime: int
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "starttime": self.starttime, "argv": list(self.argv)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "OwnerRecord":
        return cls(int(doc["pid"]), int(doc["starttime"]), tuple(doc.get("argv") or ()))

    def describe(self) -> str:
        command = " ".join(self.argv)[:80] or "?"
        return f"pid {self.pid} ({command})"


def owner_record(pid: int) -> OwnerRecord:
    """The record of live process ``pid``; LabError if there is none."""
    starttime = process_starttime(pid)
    if starttime is None or process_state(pid) in ("Z", "X"):
        raise LabError(f"lab owner pid {pid} is not a running process: set {OWNER_ENV} to the PID of the process "
                       "that will take the lab down, or unset it (the lab then lives until `tcpmesh lab down`)")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(p.decode(errors="replace") for p in f.read().split(b"\0")[:-1])
    except OSError:
        argv = ()
    return OwnerRecord(pid, starttime, argv)


def owner_pid_from_env(environ: Mapping[str, str]) -> int | None:
    """The owner ``tcpmesh lab up`` records: the PID ``TCPMESH_LAB_OWNER_PID`` names, else none."""
    text = environ.get(OWNER_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise LabError(f"{OWNER_ENV}={text!r} is not a PID: set it to the PID of the process that will take the lab "
                       "down (e.g. `export TCPMESH_LAB_OWNER_PID=$$`), or unset it")
    return int(text)


def owner_gone(owner: OwnerRecord) -> str | None:
    """Why ``owner`` is no longer the process that made the lab, or None while it lives."""
    starttime = process_starttime(owner.pid)
    if starttime is None:
        return f"its owner {owner.describe()} is gone (no such process)"
    if starttime != owner.starttime:
        return (f"its owner {owner.describe()} is gone (pid {owner.pid} now belongs to a process started at "
                f"tick {starttime}, the owner started at tick {owner.starttime})")
    if process_state(owner.pid) in ("Z", "X"):
        return f"its owner {owner.describe()} has exited (a zombie not yet reaped by its parent)"
    return None


def orphan_reason(state: Mapping[str, Any]) -> str | None:
    """Why the lab of this state.json is an orphan, or None (owner alive, or no owner recorded)."""
    doc = state.get("owner")
    if not doc:
        return None
    try:
        owner = OwnerRecord.from_json(doc)
    except (KeyError, TypeError, ValueError):
        return None   # unreadable: not ours to judge; `lab down` removes it
    return owner_gone(owner)


def orphaned_labs(state_root: str) -> list[tuple[str, str]]:
    """(lab name, why) for every lab under ``state_root`` whose recorded owner is gone, by name."""
    try:
        names = sorted(os.listdir(state_root))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            with open(os.path.join(state_root, name, "state.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        reason = orphan_reason(state) if isinstance(state, dict) else None
        if reason is not None:
            found.append((name, reason))
    return found
