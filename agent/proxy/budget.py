"""The node-wide budget for bytes the data path holds in user space, with a guaranteed share per identity.

A tcpmesh/2 stream may carry a 4 MiB window before its sender needs credit, so a workload that never
reads would leave that much per stream in the agent's memory (about 130 streams exhaust a 512 MiB
agent). The receiving side of each stream reports here what it holds (bytes handed to the workload's
socket that the kernel has not taken yet), under the identity of the local workload that reads them —
the one that can make them pile up. ``BufferBudget`` decides, per identity, whether it may take more;
the wiring (agent.proxy.session) pauses reading on that identity's tunnels while it may not, and
shrinks every stream's receive window as the whole budget fills (``window``).

The rules, for a budget of ``total`` bytes and ``shares`` guaranteed identities, with ``share = total
// (2 * shares)`` (half the budget is reserved for shares, the other half is the pool) and ``CHUNK``
the most one tunnel read delivers before a pause takes effect:

- nobody takes more once ``total`` is held;
- an identity whose next chunk fits within its share may take it while the shares in use (the sum
  of each identity's holding up to its share) are under the reserved half;
- beyond that it draws on the pool, first come first served, while the pool is not used up.

So the holding exceeds ``total`` by at most one chunk, and while at most ``shares`` identities hold
bytes each of them may always hold its share less one chunk, however much the others hold — a slow or
malicious reader stalls only its own tunnels (the property test, tests/unit/test_buffer_budget.py,
checks both on the model). An identity is told to stop once it may not take more; when the whole
budget fills, every identity holding bytes is. Releasing (a socket drained, a stream ended) returns
the bytes and resumes the identities that may take again.

Pure accounting: no asyncio, no sockets. ``memory_limit`` is the one read from the kernel (cgroup files, below
the cgroup v2 mount agent.mounts finds).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from agent.mounts import find_cgroup2_mount

log = logging.getLogger("tcpmesh.budget")
MiB = 1024 * 1024
CHUNK = MiB + 64 * 1024  # at most what one tunnel read delivers before a pause takes effect (agent.proxy.endpoints)
MAX_WINDOW = 4 * MiB  # tcpmesh/2's initial window (agent.proxy.mux.INITIAL_WINDOW)
MIN_WINDOW = 64 * 1024  # the smallest window a stream is shrunk to (while its identity is stalled)
LOW_PRESSURE = 0.25  # below this share of the budget held, windows stay at MAX_WINDOW
DEFAULT_SHARES = 8
MEMORY_FRACTION = 4  # the default budget is a quarter of the agent's memory limit ...
FALLBACK_BUDGET = 256 * MiB  # ... or this, when the cgroup sets no limit
MIN_BUDGET = 8 * MiB
MAX_DEFAULT_BUDGET = 4096 * MiB
LOG_INTERVAL = 10.0
UNLIMITED_V1 = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


class BufferBudget:
    """Bytes held per identity against a node-wide budget; ``on_stall`` / ``on_resume`` (identity) tell the
    wiring when an identity must stop taking data and when it may again."""

    def __init__(self, total: int, shares: int = DEFAULT_SHARES, *,
                 on_stall: Callable[[str], None] | None = None, on_resume: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < MIN_BUDGET or shares < 1:
            raise ValueError(f"budget {total} below {MIN_BUDGET} bytes or shares {shares} below 1")
        self.total = total
        self.shares = shares
        self.share = total // (2 * shares)
        self.reserved = self.share * shares
        self.pool = total - self.reserved
        self.on_stall = on_stall
        self.on_resume = on_resume
        self._clock = clock
        self.held = 0  # all identities together
        self._by_identity: dict[str, int] = {}
        self._within = 0  # sum over identities of min(held, share)
        self._over = 0  # sum over identities of max(0, held - share)
        self.stalled: set[str] = set()
        self.stalls = 0  # times an identity was told to stop (tcpmesh_buffer_stalls_total)
        self.peak = 0
        self._logged_at = float("-inf")
        self._unlogged = 0

    def held_by(self, identity: str) -> int:
        return self._by_identity.get(identity, 0)

    def may_take(self, identity: str) -> bool:
        """Whether ``identity`` may take more bytes now (see the module docstring for the rules)."""
        if self.held >= self.total:
            return False
        mine = self._by_identity.get(identity, 0)
        if mine < self.share:
            if self._within >= self.reserved:
                return False
            if mine + CHUNK <= self.share:
                return True
        return self._over < self.pool

    def adjust(self, identity: str, delta: int) -> None:
        """``identity`` now holds ``delta`` bytes more (or fewer, if negative)."""
        if not delta:
            return
        old = self._by_identity.get(identity, 0)
        new = old + delta
        if new < 0:
            raise ValueError(f"{identity} would hold {new} bytes: released more than it held")
        share = self.share
        self._within += min(new, share) - min(old, share)
        self._over += max(0, new - share) - max(0, old - share)
        self.held += delta
        if new:
            self._by_identity[identity] = new
        else:
            del self._by_identity[identity]
        if delta > 0:
            if self.held > self.peak:
                self.peak = self.held
            if identity not in self.stalled and not self.may_take(identity):
                self._stall(identity)
            if self.held >= self.total > self.held - delta:  # just filled: nobody holding bytes reads on
                for other in [i for i in self._by_identity if i not in self.stalled]:
                    self._stall(other)
        elif self.stalled:
            for other in [i for i in self.stalled if self.may_take(i)]:
                self.stalled.discard(other)
                if self.on_resume is not None:
                    self.on_resume(other)

    def window(self, identity: str) -> int:
        """The receive window a stream of ``identity`` should offer now: the full window while little of the
        budget is held, shrinking linearly to ``MIN_WINDOW`` as it fills; ``MIN_WINDOW`` while stalled."""
        if identity in self.stalled:
            return MIN_WINDOW
        used = self.held / self.total
        if used <= LOW_PRESSURE:
            return MAX_WINDOW
        return max(MIN_WINDOW, int(MAX_WINDOW * (1.0 - used) / (1.0 - LOW_PRESSURE)))

    def _stall(self, identity: str) -> None:
        self.stalled.add(identity)
        self.stalls += 1
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= LOG_INTERVAL:
            log.warning("buffer budget: %s holds %d bytes its workloads have not read (share %d; %d of %d held on "
                        "this node, proxy.buffer_budget_bytes); its tunnels pause until they read — %d stall(s) "
                        "since the last message", identity, self.held_by(identity), self.share, self.held,
                        self.total, self._unlogged)
            self._logged_at = now
            self._unlogged = 0
        if self.on_stall is not None:
            self.on_stall(identity)


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup",
                 cgroup2_mount: str | None = None) -> int | None:
    """The memory limit of this process's cgroup, the tightest of it and its ancestors: cgroup v2
    ``memory.max`` below ``cgroup2_mount`` (the host's, as agent.mounts finds it: /sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host), else (hybrid hosts) the v1 memory controller's
    ``memory.limit_in_bytes`` below ``root``/memory; None when no limit is set or none can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            if cgroup2_mount is None:
                continue
            base, name = Path(cgroup2_mount), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            value = _read_limit(here / name)
            if value is not None:
                limits.append(value)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(limits) if limits else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= UNLIMITED_V1 else value


def default_budget(limit: int | None) -> int:
    """The budget when ``proxy.buffer_budget_bytes`` is 0: a quarter of the memory limit, or
    ``FALLBACK_BUDGET`` without one; never below ``MIN_BUDGET`` nor above ``MAX_DEFAULT_BUDGET``."""
    if limit is None:
        return FALLBACK_BUDGET
    return max(MIN_BUDGET, min(MAX_DEFAULT_BUDGET, limit // MEMORY_FRACTION))


def budget_from_config(configured: int, shares: int, **callbacks) -> tuple[BufferBudget, str]:
    """The agent's budget and a sentence saying where its size came from (for the start-up log)."""
    if configured:
        return BufferBudget(configured, shares, **callbacks), "proxy.buffer_budget_bytes"
    limit = memory_limit(cgroup2_mount=find_cgroup2_mount())
    total = default_budget(limit)
    origin = (f"a quarter of the cgroup memory limit ({limit} bytes)" if limit is not None
              else f"no cgroup memory limit found (pid {os.getpid()}): the fallback")
    return BufferBudget(total, shares, **callbacks), origin
