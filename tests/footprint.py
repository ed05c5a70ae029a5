"""What a running agent process must not carry: the pyroute2 package. Importing any part of pyroute2 imports all of
it (NDB with sqlite3, multiprocessing, pickle): ≈ 10 MiB of RSS per agent (docs/performance-notes.md; the agent's
plumbing runs pyroute2 in child processes). The marker is sqlite3's extension module in the process's memory map:
only the pyroute2 package brings it into an agent. Read by tests/integration/test_agent_footprint.py (an agent in
capture mode none) and tests/e2e/test_telemetry_lab.py (a lab's agents in ebpf-connect, after their tests)."""

from __future__ import annotations

from pathlib import Path

PYROUTE2_MARKER = "_sqlite3"
PYROUTE2_LOADED = ("loaded the pyroute2 package (sqlite3 is mapped): ≈ 10 MiB of RSS per agent; keep pyroute2 in the "
                   "plumbing's child processes")


def pyroute2_mapped(pid: int) -> list[str]:
    """The lines of /proc/PID/maps that show the pyroute2 package loaded (none: it is not)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if PYROUTE2_MARKER in line]
