"""Which ready endpoint of a Service a new connection goes to: round robin, per Service.

Round robin rather than power-of-two-choices on open streams: it needs no per-endpoint count kept
up to date on every open and close (one counter per Service, one modulo per connect), it is
deterministic (a client opening N connections spreads them evenly — what the lab's tests check),
and each node's agent sees only its own node's connections anyway, so its open-stream counts would
not be the endpoint's real load. Docs: docs/registry.md "Services".

Pure: no I/O, no clock. Imports the registry model only.
"""

from __future__ import annotations

from typing import Sequence

from agent.registry.model import Workload


class RoundRobin:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, service_key: str, ready: Sequence[Workload]) -> Workload | None:
        """The next ready endpoint of ``service_key``, or None when there is none."""
        if not ready:
            return None
        turn = self._next.get(service_key, 0)
        self._next[service_key] = turn + 1
        return ready[turn % len(ready)]
