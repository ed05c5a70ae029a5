"""Following this node's addresses as they change: each is a nodePort and hostPort frontend (kube-proxy and the
CNI portmap plugin answer on every local address), so an address the node gets after the start must become one
at once — not at the next registry change, which may never come (until then a pod reached a nodePort there in
plaintext, past a DENY: tests/hostile/test_hostile_node_port.py).

``NodeAddressFollower`` reads rtnetlink's address notifications (agent.capture.local_addresses.AddressEvents) on
the agent's loop. A notification only says *when*: the first of a burst arms one timer, ``COALESCE_SECONDS``
later the addresses are read again with one dump and, if they differ from those last applied, the registry
snapshot is applied again (agent.control.workloads.WorkloadController.refresh_node_addresses). So a flood of
address events (kube-proxy's IPVS mode adds every ClusterIP to kube-ipvs0; a CNI adding many pods) costs one
re-read per COALESCE_SECONDS, and an address is a frontend within COALESCE_SECONDS plus one apply of its
arrival (docs/capture-modes.md). Imports no pyroute2 (docs/performance-notes.md) and nothing of the capture modes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

log = logging.getLogger("tcpmesh.workloads")

COALESCE_SECONDS = 0.25  # from the first notification of a burst to the one re-read of the addresses


class Notifications(Protocol):
    def fileno(self) -> int: ...

    def drain(self) -> bool:
        """Read what is pending; True when an address may have changed."""

    def close(self) -> None: ...


class NodeAddressFollower:
    def __init__(self, loop: asyncio.AbstractEventLoop, events: Notifications, refresh: Callable[[], object],
                 delay: float = COALESCE_SECONDS) -> None:
        self._loop = loop
        self._events = events
        self._refresh = refresh
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self.refreshes = 0  # re-reads run (each one dump; a re-apply only when the addresses differ)

    def start(self) -> None:
        self._loop.add_reader(self._events.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            changed = self._events.drain()
        except OSError as exc:  # the socket broke: read once more now, and say that addresses are not followed
            log.error("this node's address notifications failed (%s): an address added from now on is a nodePort "
                      "frontend only at the next registry change; restart the agent", exc)
            self._loop.remove_reader(self._events.fileno())
            changed = True
        if changed and self._timer is None:
            self._timer = self._loop.call_later(self._delay, self._run)

    def _run(self) -> None:
        self._timer = None
        self.refreshes += 1
        try:
            self._refresh()
        except Exception:  # noqa: BLE001 — a task root: the next notification tries again
            log.exception("applying this node's changed addresses failed")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._loop.remove_reader(self._events.fileno())
        except (ValueError, OSError):
            pass
        self._events.close()
