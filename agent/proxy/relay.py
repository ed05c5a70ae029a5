"""Copies bytes between two legs in both directions, carrying half-close and back-pressure.

Callback-driven (no per-chunk coroutine): data read on one leg is written to the other at once;
when a leg's write buffer fills, reading on the opposite leg pauses until it drains. EOF on one
side becomes a half-close on the other; the relay ends when both directions have ended, or at once
when either connection is lost abruptly (then the other is reset).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agent.proxy.endpoints import Leg
from agent.proxy.state import RelayCore


@dataclass(frozen=True)
class RelayResult:
    a_to_b: int  # bytes read from a and written to b
    b_to_a: int
    error: str = ""  # empty when both directions ended with a clean EOF


class Relay(RelayCore):
    """Its legs and direction counts are ``RelayCore``'s fields (agent.proxy.state): the compiled relay steps
    read them (agent/proxy/_hotpath.c)."""

    takes_views = True  # a leg's write copies what it keeps (agent.proxy.endpoints): views pass straight through

    def __init__(self, a: Leg, b: Leg) -> None:
        self.a = a
        self.b = b
        self._a_eof = False  # EOF read from a (and passed on to b)
        self._b_eof = False
        self._a_to_b = 0
        self._b_to_a = 0
        self.done: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()

    def start(self, a_leftover: bytes = b"", b_leftover: bytes = b"") -> "asyncio.Future[RelayResult]":
        """Begin relaying; ``*_leftover`` are bytes a leg read past its header before the relay took over."""
        if a_leftover:
            self.leg_data(self.a, a_leftover)
        if b_leftover:
            self.leg_data(self.b, b_leftover)
        self.a.set_receiver(self)
        self.b.set_receiver(self)
        self.a.resume_reading()
        self.b.resume_reading()
        return self.done

    @property
    def a_to_b(self) -> int:
        """Bytes relayed from a to b so far (read by live telemetry while the relay runs)."""
        return self._a_to_b

    @property
    def b_to_a(self) -> int:
        return self._b_to_a

    def _other(self, leg: Leg) -> Leg:
        return self.b if leg is self.a else self.a

    def peer_of(self, leg: Leg) -> Leg:
        """The leg ``leg``'s data is written to (a stream's budget watches that leg's write buffer)."""
        return self._other(leg)

    def leg_data(self, leg: Leg, data: bytes | memoryview) -> None:
        # a small message between a Stream and a PlainLeg takes the compiled twins, both ways (agent/proxy/_hotpath.c
        # stream_deliver, relay_send): change them together (tests/unit/test_hotpath.py compares them)
        if leg is self.a:
            self._a_to_b += len(data)
            self.b.write(data)
        else:
            self._b_to_a += len(data)
            self.a.write(data)

    def leg_eof(self, leg: Leg) -> None:
        if leg is self.a:
            if self._a_eof:
                return
            self._a_eof = True
        else:
            if self._b_eof:
                return
            self._b_eof = True
        self._other(leg).write_eof()
        if self._a_eof and self._b_eof:
            self._finish("")

    def leg_closed(self, leg: Leg, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None and (self._a_eof if leg is self.a else self._b_eof) and self._other(leg).peer_eof:
            self._finish("")
            return
        reason = f"{'client' if leg is self.a else 'upstream'} connection lost: {exc or 'closed before end of stream'}"
        self._other(leg).reset()
        self._finish(reason)

    def leg_pause_writing(self, leg: Leg) -> None:
        self._other(leg).pause_reading()

    def leg_resume_writing(self, leg: Leg) -> None:
        self._other(leg).resume_reading()

    def _finish(self, error: str) -> None:
        if self.done.done():
            return
        if not error:
            self.a.close()
            self.b.close()
        self.done.set_result(RelayResult(self._a_to_b, self._b_to_a, error))

    def abort(self, reason: str) -> None:
        """Stop now (agent shutdown past its drain time, a workload removed): reset both legs."""
        if self.done.done():
            return
        self.a.reset()
        self.b.reset()
        self._finish(reason)
