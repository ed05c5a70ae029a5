"""Where the processes of one path run while it is measured: the ping-pong's CPU layouts.

On a machine whose idle CPUs halt (a VM without guest halt-polling, like the CI and development VMs:
``haltpoll.guest_halt_poll_ns=0``), waking a process on an idle CPU costs more the longer that CPU
has been idle (docs/performance-latency.md, "Where the processes run"). Left to the scheduler, a
1-byte ping-pong through two proxies lands in a different layout from run to run — the direct path
alone measured 24 or 82 µs — so the bench also measures each path in two fixed layouts:

- ``1cpu``: every process of the path (client, both nodes' data path, server) on one CPU. No idle
  CPU is woken: what is left is each proxy's own work per hop and the context switches.
- ``nodes``: node 1's processes (the client and node 1's data path) on one CPU, node 2's (its data
  path and the server) on another: every cross-node hop wakes the other node's CPU, as between two
  machines; hops within a node do not.

``free`` (no pinning) is the bench's original ping-pong. Pinning covers every thread of the
processes that exist when the measurement starts; a thread started later inherits its creator's CPUs.
Everything is put back on all the CPUs this process may use afterwards, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

LAYOUTS = ("free", "1cpu", "nodes")


def assignments(layout: str, allowed: Sequence[int], datapath_groups: int) -> dict[str, int] | None:
    """Role → CPU for ``layout``: roles are ``client``, ``server`` and ``datapath<i>`` (the path's data-path
    cgroups in order: node 1's first). None for ``free``. Raises when the layout needs CPUs the process lacks."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CPU layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout == "free":
        return None
    cpus = sorted(allowed)
    if layout == "1cpu":
        return {"client": cpus[0], "server": cpus[0], **{f"datapath{i}": cpus[0] for i in range(datapath_groups)}}
    if len(cpus) < 2:
        raise RuntimeError(f"the 'nodes' layout needs two CPUs; this process may use only CPU {cpus[0]}")
    first, second = cpus[0], cpus[1]
    out = {"client": first, "server": second if datapath_groups != 1 else first}
    for i in range(datapath_groups):
        out[f"datapath{i}"] = first if i == 0 else second
    return out


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin(pids: Sequence[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` onto ``cpus``; processes or threads that are gone are skipped."""
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def placed(layout: str, server_pids: Sequence[int], datapath_pids: Sequence[Sequence[int]]) -> Iterator[None]:
    """Run the body with the path's processes in ``layout``. The client is the process the body starts:
    this thread is pinned to the client's CPU for the body, and its children inherit that."""
    allowed = os.sched_getaffinity(0)
    roles = assignments(layout, allowed, len(datapath_pids))
    if roles is None:
        yield
        return
    groups = {"server": list(server_pids), **{f"datapath{i}": list(p) for i, p in enumerate(datapath_pids)}}
    try:
        for role, pids in groups.items():
            pin(pids, {roles[role]})
        os.sched_setaffinity(0, {roles["client"]})
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        for pids in groups.values():
            pin(pids, allowed)
