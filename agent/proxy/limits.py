"""Caps on concurrent connections — overall and per source identity — and the agent's open-files limit.

Each proxy side (reporter) has one ``ConnectionLimits``: the outbound side counts application
connections per source workload identity, the inbound side counts streams per client identity (the
SPIFFE ID its tunnel's certificate proved). A connection is counted from ``try_acquire`` (before
anything is dialled) to ``release``; a refusal is reported to ``on_hit`` (a metric) and logged at
most once per ``LOG_INTERVAL`` per limit, so a flood cannot flood the log too.

The same counting caps the inbound side's unauthenticated TLS handshakes (``handshake_limits``):
overall and per source address, from accept to the end of the handshake.

Pure counting: no asyncio, no sockets. ``raise_open_files_limit`` is the one call into the kernel.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Callable

log = logging.getLogger("tcpmesh.limits")
LIMIT_TOTAL = "total"
LIMIT_PER_IDENTITY = "per_identity"
LIMIT_PER_SOURCE = "per_source"
LIMITS = (LIMIT_TOTAL, LIMIT_PER_IDENTITY)
HANDSHAKE_REPORTER = "handshake"
LOG_INTERVAL = 10.0
FDS_PER_CONNECTION = 2  # worst case on one agent: a same-node connection holds the app's and the workload's socket
FDS_RESERVED = 1024  # listeners, tunnels, logs, BPF maps, the admin endpoint


class ConnectionLimits:
    """Counts open connections per identity; 0 means unlimited."""

    def __init__(self, reporter: str, total: int = 0, per_identity: int = 0,
                 on_hit: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 names: tuple[str, str] = LIMITS,
                 settings: tuple[str, str] = ("proxy.max_connections", "proxy.max_connections_per_identity"),
                 counted: str = "connections") -> None:
        self.reporter = reporter
        self.total = total
        self.per_identity = per_identity
        self._on_hit = on_hit  # (reporter, limit)
        self._clock = clock
        self._names = names  # the two limits as metrics and logs name them: overall, per key
        self._settings = settings  # the config fields that set them
        self._counted = counted
        self._by_identity: dict[str, int] = {}
        self.active = 0
        self.refused = {limit: 0 for limit in names}
        self._unlogged = {limit: 0 for limit in names}
        self._logged_at = {limit: float("-inf") for limit in names}

    def try_acquire(self, identity: str) -> str | None:
        """Count a new connection of ``identity``; or refuse it and return the limit it hit."""
        count = self._by_identity.get(identity, 0)
        if self.total and self.active >= self.total:
            return self._refuse(self._names[0], identity)
        if self.per_identity and count >= self.per_identity:
            return self._refuse(self._names[1], identity)
        self._by_identity[identity] = count + 1
        self.active += 1
        return None

    def release(self, identity: str) -> None:
        count = self._by_identity.get(identity, 0)
        if count <= 0:
            return
        if count == 1:
            del self._by_identity[identity]
        else:
            self._by_identity[identity] = count - 1
        self.active -= 1

    def open_for(self, identity: str) -> int:
        return self._by_identity.get(identity, 0)

    @property
    def identities(self) -> int:
        """How many identities hold at least one connection (bounded: entries go with their last one)."""
        return len(self._by_identity)

    def describe(self, limit: str, identity: str) -> str:
        if limit == self._names[0]:
            return (f"{self.active} {self._counted} open on the {self.reporter} side "
                    f"({self._settings[0]}={self.total})")
        return (f"{identity} has {self.open_for(identity)} {self._counted} open on the {self.reporter} side "
                f"({self._settings[1]}={self.per_identity})")

    def _refuse(self, limit: str, identity: str) -> str:
        self.refused[limit] += 1
        self._unlogged[limit] += 1
        if self._on_hit is not None:
            self._on_hit(self.reporter, limit)
        now = self._clock()
        if now - self._logged_at[limit] >= LOG_INTERVAL:
            log.warning("connection limit reached: %s; refused %d connection(s) since the last message",
                        self.describe(limit, identity), self._unlogged[limit])
            self._logged_at[limit] = now
            self._unlogged[limit] = 0
        return limit


def handshake_limits(total: int, per_source: int, on_hit: Callable[[str, str], None] | None = None,
                     clock: Callable[[], float] = time.monotonic) -> ConnectionLimits:
    """The inbound side's cap on unauthenticated TLS handshakes, overall and per source address."""
    return ConnectionLimits(HANDSHAKE_REPORTER, total, per_source, on_hit, clock, names=(LIMIT_TOTAL, LIMIT_PER_SOURCE),
                            settings=("proxy.max_handshakes", "proxy.max_handshakes_per_source"),
                            counted="unauthenticated handshakes")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (never lower it), as systemd advises for
    services that use epoll; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def fitting_cap(max_connections: int, open_files: int) -> int:
    """``proxy.max_connections``, lowered to what ``open_files`` descriptors can hold (0: no cap, unless the
    limit forces one): a clean CONNECTION_LIMIT refusal beats EMFILE in the middle of a handshake."""
    fits = max(1, (open_files - FDS_RESERVED) // FDS_PER_CONNECTION)
    if max_connections and max_connections <= fits:
        return max_connections
    log.warning("the open-files limit (%d) holds about %d connections per side, so the cap is %d instead of "
                "proxy.max_connections=%s; raise the hard limit (systemd: LimitNOFILE=) to lift it",
                open_files, fits, fits, max_connections or "0 (none)")
    return fits
