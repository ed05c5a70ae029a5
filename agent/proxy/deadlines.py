"""Time limits that keep a silent or vanished peer from holding the agent's resources forever.

- ``tune_tunnel_socket``: a tunnel whose TCP peer vanished without a FIN or RST (a cut wire, a
  crashed node) is declared lost after ``proxy.tunnel_timeout_seconds`` — by TCP_USER_TIMEOUT when
  data goes unacknowledged, by keepalive probes when the tunnel is idle — so its streams are reset
  and their applications see ECONNRESET instead of hanging for the kernel's ~15 minutes.
  Kernel-level on purpose: no frame type is added to tcpmesh/2, and both ends protect themselves.
- ``enforce_tunnel_deadlines``: an inbound tunnel must send a complete OPEN within
  ``proxy.handshake_timeout_seconds`` of its TCP accept, and is closed (GOAWAY) once it has
  carried no stream for ``proxy.inbound_tunnel_idle_seconds``; once the credential it was opened
  with no longer holds (``revoked``: an expired client chain, a root gone from the bundle) it is
  closed when its last stream ends, and at the latest ``proxy.revoked_tunnel_grace_seconds`` later.
- ``sweep_idle_relays``: a connection that moved no byte either way for
  ``proxy.stream_idle_timeout_seconds`` is reset on both sides (``response_flags="SI"``).

Touches sockets only through ``setsockopt``; everything else works on sessions and relays.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable, Iterable, Mapping

from agent.connection.flow import FLAG_STREAM_IDLE_TIMEOUT
from agent.proxy.session import Stream

log = logging.getLogger("tcpmesh.deadlines")
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
KEEPALIVE_PROBES = 3
MAX_POLL_SECONDS = 1.0  # how often a tunnel's deadlines are looked at
MAX_SWEEP_SECONDS = 30.0  # how often idle connections are looked for


def keepalive_settings(timeout: float) -> tuple[int, int, int, int]:
    """(TCP_KEEPIDLE s, TCP_KEEPINTVL s, TCP_KEEPCNT, TCP_USER_TIMEOUT ms) that end a silent tunnel
    within about ``timeout`` seconds: probes start after half of it, three probes fill the rest,
    and the user timeout bounds unacknowledged data (and, with keepalive on, the probes) to it."""
    idle = max(1, int(timeout / 2))
    interval = max(1, int((timeout - idle) / KEEPALIVE_PROBES))
    return idle, interval, KEEPALIVE_PROBES, int(timeout * 1000)


def tune_tunnel_socket(sock, timeout: float) -> bool:
    """Apply ``keepalive_settings(timeout)`` to a tunnel's TCP socket; 0 leaves the kernel defaults."""
    if sock is None or timeout <= 0:
        return False
    idle, interval, count, user_timeout = keepalive_settings(timeout)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, user_timeout)
    except (OSError, ValueError) as exc:  # uvloop raises ValueError once the socket is closed
        log.debug("cannot set keepalive on a tunnel socket: %s", exc)
        return False
    return True


async def enforce_tunnel_deadlines(session, open_timeout: float, idle_timeout: float, started: float,
                                   clock: Callable[[], float] = time.monotonic, *,
                                   revoked: Callable[[], str | None] | None = None, grace: float = 0.0,
                                   on_revoked: Callable[[str], None] | None = None) -> str | None:
    """Watch an inbound ``MuxSession`` until it closes. Returns None when it closed on its own, or
    ``"open"`` / ``"idle"`` after closing it because no OPEN came in time or it stayed unused, or
    ``"revoked"`` (its last stream ended) / ``"revoked_grace"`` (``grace`` ran out with streams open)
    once ``revoked()`` named a reason — reported once to ``on_revoked``."""
    seen = session.opened_streams
    idle_since = clock()
    revoked_since: float | None = None
    step = min(MAX_POLL_SECONDS, open_timeout, idle_timeout or MAX_POLL_SECONDS)
    while not session.closed.done():
        await asyncio.wait([session.closed], timeout=step)
        if session.closed.done():
            return None
        now = clock()
        if revoked is not None and revoked_since is None:
            reason = revoked()
            if reason is not None:
                revoked_since = now
                if on_revoked is not None:
                    on_revoked(reason)
        if revoked_since is not None:
            if not session.streams:
                return "revoked"
            if now - revoked_since >= grace:
                return "revoked_grace"
            continue
        if session.opened_streams == 0:
            if now - started >= open_timeout:
                return "open"
            continue
        if session.streams or session.opened_streams != seen:
            seen, idle_since = session.opened_streams, now
        elif idle_timeout and now - idle_since >= idle_timeout:
            return "idle"
    return None


def idle_relays(relays: Iterable, last: Mapping, now: float, idle_timeout: float) -> tuple[list, dict]:
    """Pure step of the sweep: (relays idle for ``idle_timeout``, the new ``last`` mapping).

    ``last`` maps a relay to (bytes a→b, bytes b→a, time they last changed)."""
    expired, current = [], {}
    for relay in relays:
        counts = (relay.a_to_b, relay.b_to_a)
        previous = last.get(relay)
        since = previous[2] if previous is not None and previous[:2] == counts else now
        if now - since >= idle_timeout:
            expired.append(relay)
        else:
            current[relay] = (*counts, since)
    return expired, current


async def sweep_idle_relays(relays: Mapping, idle_timeout: float, on_idle: Callable[[object, object], None],
                            clock: Callable[[], float] = time.monotonic) -> None:
    """Forever: call ``on_idle(relay, flow)`` for every relay of ``relays`` (relay → flow) that moved
    no byte for ``idle_timeout`` seconds. Runs until cancelled; a failed round is logged."""
    interval = max(0.05, min(idle_timeout / 4, MAX_SWEEP_SECONDS))
    last: dict = {}
    while True:
        await asyncio.sleep(interval)
        try:
            expired, last = idle_relays(list(relays), last, clock(), idle_timeout)
            for relay in expired:
                flow = relays.get(relay)
                if flow is not None:
                    on_idle(relay, flow)
        except Exception:  # a task root: one bad round must not end the sweep
            log.exception("idle connection sweep failed")


def reset_idle(relay, flow, idle_timeout: float) -> None:
    """``sweep_idle_relays``'s action in the agent: record why, then reset both sides of the connection."""
    reason = (f"no byte in either direction for {idle_timeout:g}s (proxy.stream_idle_timeout_seconds): "
              "reset both sides")
    flow.fail(FLAG_STREAM_IDLE_TIMEOUT, reason)
    for leg in (relay.a, relay.b):
        if isinstance(leg, Stream):  # the RST carries the reason: the other node's record names it too
            leg.reset(reason)
    relay.abort(reason)
