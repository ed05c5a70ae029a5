"""Reusable tcpmesh/2 tunnels on the outbound side, one pool entry per (source identity, destination
node, destination identity): an application connection becomes a new stream on an open tunnel,
with no TLS handshake — every stream still runs under the source workload's own certificate and is
checked against the destination's own identity, because both are part of the key.

Concurrent connections that find no usable tunnel share one dial; a tunnel that closes leaves the
pool; a tunnel idle for ``idle_seconds`` is closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from agent.identity.spiffe import SpiffeId
from agent.proxy.session import MuxSession

log = logging.getLogger("tcpmesh.pool")
DEFAULT_IDLE_SECONDS = 60.0


@dataclass(frozen=True)
class PoolKey:
    source: SpiffeId
    address: tuple[str, int]
    destination: SpiffeId
    credentials: int = 0  # identifies the client TLS context (changes when the source's SVID rotates)


class TunnelPool:
    def __init__(self, dial: Callable[[PoolKey], Awaitable[MuxSession]],
                 idle_seconds: float = DEFAULT_IDLE_SECONDS) -> None:
        self._dial = dial
        self._idle_seconds = idle_seconds
        self._sessions: dict[PoolKey, list[MuxSession]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[MuxSession]] = {}
        self._idle_since: dict[MuxSession, float] = {}
        self.dials = 0

    async def session(self, key: PoolKey) -> MuxSession:
        for session in self._sessions.get(key, ()):
            if session.usable:
                self._idle_since.pop(session, None)
                return session
        pending = self._dialing.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._dialing[key] = pending
        try:
            session = await self._dial(key)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self._dialing.pop(key, None)
        self.dials += 1
        self._sessions.setdefault(key, []).append(session)
        session.closed.add_done_callback(lambda _: self._drop(key, session))
        pending.set_result(session)
        return session

    def _drop(self, key: PoolKey, session: MuxSession) -> None:
        sessions = self._sessions.get(key, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self._sessions.pop(key, None)
        self._idle_since.pop(session, None)

    @property
    def open_sessions(self) -> int:
        return sum(len(s) for s in self._sessions.values())

    def reap_idle(self, now: float) -> int:
        """Close tunnels that carried no stream for ``idle_seconds``; returns how many were closed."""
        closed = 0
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                if session.streams:
                    self._idle_since.pop(session, None)
                    continue
                since = self._idle_since.setdefault(session, now)
                if now - since >= self._idle_seconds:
                    session.close("idle")
                    closed += 1
        return closed

    async def reap_forever(self, interval: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.reap_idle(loop.time())

    def close_all(self, reason: str) -> None:
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.close(reason)
