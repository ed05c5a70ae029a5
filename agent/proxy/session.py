"""tcpmesh/2 over one mTLS tunnel: ``MuxSession`` demultiplexes frames (agent.proxy.mux) into
``Stream``s, and each ``Stream`` is a relay leg like a socket, so ``Relay`` copies between an
application's TCP connection and a stream exactly as it does between two sockets.

Back-pressure, per stream: a stream may send only as many DATA bytes as its peer granted (WINDOW);
when its window is used up, or the tunnel's own write buffer is full, the relay is told to stop
reading the application. The receiving side returns credit as it hands data onward, and holds it
back while the relay says the application's socket is full. One slow application therefore never
stalls the other streams of the tunnel.

Memory, node-wide (agent.proxy.budget): what a stream's receiving side holds in user space — the bytes
its workload's socket has not taken yet — is reported to the ``BufferBudget`` under the tunnel's local
identity (``MuxSession.identity``: the workload that reads them). While the budget stalls that identity,
``BufferGate`` pauses reading on its tunnels (their other streams wait too: they belong to the same
identity pair); and every stream's receive window shrinks as the budget fills, by holding back part of
the credit it returns (``Stream._debt``). Without a budget (``budget=None``) none of this runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Callable

from agent.connection.facts import ConnectionFacts
from agent.proxy import hotpath
from agent.proxy import mux as M
from agent.proxy.budget import BufferBudget
from agent.proxy.endpoints import SMALL_WRITE, Leg, TlsLeg
from agent.proxy.header import (PeerProtocolError, StatusReply, decode_connect_body,
                                decode_status_body, encode_connect_body, encode_status_body)
from agent.proxy.kernel_leg import KernelTlsLeg
from agent.proxy.state import SessionCore, StreamCore

log = logging.getLogger("tcpmesh.session")
_DATA = M.FrameType.DATA
CREDIT_THRESHOLD = M.INITIAL_WINDOW // 4
MAX_STREAMS_PER_SESSION = 4096
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state
WAKE_INTERVAL = 1.0  # how often stalled tunnels are looked at for a peer that has gone (BufferGate.wake_ended)


class Stream(Leg, StreamCore):
    """One application connection inside a tunnel, seen as a relay leg (its window and credit in ``StreamCore``:
    agent.proxy.state)."""

    def __init__(self, session: "MuxSession", stream_id: int) -> None:
        super().__init__()
        self.session = session
        self.id = stream_id
        self.send_window = M.INITIAL_WINDOW
        # the client's wait for STATUS (MuxSession.open); a server-side stream has none
        self.status: asyncio.Future[StatusReply] | None = None
        # DATA waiting for window credit; created at first use (an empty deque holds a 64-slot block)
        self._queued: collections.deque[bytes] | None = None
        self._fin_queued = False
        self._writer_blocked = False  # what the receiver was last told (pause/resume_writing)
        self._reading_paused = False
        self._unreturned = 0
        self._finished = False
        # the budget (only with session.budget): bytes held in the workload's socket buffer as last
        # reported, credit held back to shrink the peer's window, and when to return credit
        self._sink: Leg | None = None
        self._held = 0
        self._debt = 0
        self._threshold = CREDIT_THRESHOLD

    # -- as a leg (called by the relay) ---------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        # the reference of relay_send in agent/proxy/_hotpath.c (with PlainLeg.buffer_updated, Relay.leg_data and
        # TlsLeg.write_data_frame): change both together (tests/unit/test_hotpath.py compares them)
        if self.eof_sent or self._finished:
            return
        size = len(data)
        self.bytes_written += size
        if not self._queued and size <= self.send_window:  # the steady state: all of it goes now
            self.send_window -= size
            if size < SMALL_WRITE:  # send_data's first case without its call
                self.session.tls.write_data_frame(self.id, data)
            else:
                self.session.send_data(self.id, data)
            if self.send_window <= 0 or self.session.tunnel_blocked or self._writer_blocked:
                self.update_writer_blocked()
            return
        if self._queued or self.send_window <= 0:
            self._queue(data)
        else:
            take = min(len(data), self.send_window)
            self.send_window -= take
            self.session.send_data(self.id, data if take == len(data) else data[:take])
            if take < len(data):
                self._queue(data[take:])
        self.update_writer_blocked()

    def write_eof(self) -> None:
        if self.eof_sent or self._finished:
            return
        self.eof_sent = True
        if self._queued:
            self._fin_queued = True
        else:
            self.session.send(M.encode(M.FrameType.FIN, self.id))
        self._finish_if_done()

    def pause_reading(self) -> None:
        """The workload's socket is full (its transport above its high-water mark): hold credit back, and
        from now on count what its transport holds against the budget."""
        self._reading_paused = True
        if self._sink is not None:
            self._settle()

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._held:  # drained below the low-water mark: what is left is the connection's own margin
            self._charge(-self._held)
        self._return_credit(force=True)

    def set_receiver(self, receiver) -> None:
        if self.session.budget is not None:  # the leg this stream's data goes to (a relay's other side)
            peer_of = getattr(receiver, "peer_of", None)
            self._sink = peer_of(self) if peer_of is not None else None
        super().set_receiver(receiver)
        self._return_credit(force=True)

    def reset(self, reason: str = "reset") -> None:
        if self._finished:
            return
        self.session.send(M.encode(M.FrameType.RST, self.id, reason.encode()[:M.MAX_CONTROL_PAYLOAD]))
        self._end()

    def close(self) -> None:
        """The relay finished cleanly: both FINs were exchanged (or will be, once queued data is sent)."""
        self._finish_if_done()

    def socket(self):
        return None

    def peername(self):
        return None

    # -- from the session ----------------------------------------------------------------------
    def on_data(self, payload: bytes | memoryview) -> None:
        """A DATA part; a view of the tunnel's reused buffer when it comes from ``feed_parts``. The
        reference of ``stream_deliver`` in agent/proxy/_hotpath.c (with Relay.leg_data and PlainLeg.write):
        change both together (tests/unit/test_hotpath.py compares them)."""
        if self.peer_eof:
            raise M.MuxProtocolError(f"DATA after FIN on stream {self.id}")
        self._unreturned += len(payload)
        if self._unreturned + self._debt > M.INITIAL_WINDOW + CREDIT_THRESHOLD:
            raise M.MuxProtocolError(f"stream {self.id} sent beyond its window")
        receiver = self.receiver
        if type(payload) is not memoryview:
            self._deliver(payload)
        elif receiver is not None and getattr(receiver, "takes_views", False):  # _deliver_view without its call
            self.bytes_read += len(payload)
            receiver.leg_data(self, payload)
        else:
            self._deliver_view(payload)
        if self._reading_paused and self._sink is not None:
            self._settle()
        if self._unreturned >= self._threshold:  # what _return_credit() would check first
            self._return_credit()

    def on_fin(self) -> None:
        self._deliver_eof()
        self._finish_if_done()

    def on_window(self, credit: int) -> None:
        self.send_window += credit
        queued = self._queued
        while queued and self.send_window > 0:
            chunk = queued.popleft()
            take = min(len(chunk), self.send_window)
            self.send_window -= take
            self.session.send_data(self.id, chunk if take == len(chunk) else chunk[:take])
            if take < len(chunk):
                queued.appendleft(chunk[take:])
        if not queued:
            self._queued = None  # an idle stream holds no deque
        if not queued and self._fin_queued:
            self._fin_queued = False
            self.session.send(M.encode(M.FrameType.FIN, self.id))
            self._finish_if_done()
        self.update_writer_blocked()

    def on_reset(self, exc: BaseException) -> None:
        if self._finished:
            return
        if self.status is not None and not self.status.done():
            self.status.set_exception(exc)
        self._end()
        self.lost = True
        if self.receiver is not None:
            self.receiver.leg_closed(self, exc)
        else:
            self._pending_closed = (exc,)

    def update_writer_blocked(self) -> None:
        # window used up: stop the application before it hands over data that would have to wait (and be copied)
        blocked = bool(self._queued) or self.send_window <= 0 or self.session.tunnel_blocked
        if blocked != self._writer_blocked and self.receiver is not None:
            self._writer_blocked = blocked
            if blocked:
                self.receiver.leg_pause_writing(self)
            else:
                self.receiver.leg_resume_writing(self)

    # -- internals ------------------------------------------------------------------------------
    def _queue(self, chunk: bytes | memoryview) -> None:
        if self._queued is None:
            self._queued = collections.deque()
        self._queued.append(bytes(chunk) if type(chunk) is memoryview else chunk)  # a view's buffer is reused

    def _return_credit(self, force: bool = False) -> None:
        if self._reading_paused or self.receiver is None or self.peer_eof or not self._unreturned:
            return
        if force or self._unreturned >= self._threshold:
            credit = self._unreturned
            budget = self.session.budget
            if budget is not None:  # shrink (or grow back) the peer's window to what the budget allows now
                window = budget.window(self.session.identity)
                target = M.INITIAL_WINDOW - window
                credit += self._debt - target
                self._threshold = max(1, min(CREDIT_THRESHOLD, window // 4))
                if credit <= 0:
                    self._debt += self._unreturned
                    self._unreturned = 0
                    return
                self._debt = target
            self.session.send(M.encode_window(self.id, credit))
            self._unreturned = 0

    def _settle(self) -> None:
        """Report to the budget what the workload's socket buffer holds now (while the socket is full)."""
        if not self._finished and self._sink is not None:
            held = self._sink.write_buffer_size()
            if held != self._held:
                self._charge(held - self._held)

    def _charge(self, delta: int) -> None:
        self._held += delta
        self.session.budget.adjust(self.session.identity, delta)  # type: ignore[union-attr]

    def _finish_if_done(self) -> None:
        if self.eof_sent and not self._fin_queued and self.peer_eof:
            self._end()

    def _end(self) -> None:
        self._finished = True
        if self._held:
            self._charge(-self._held)
        self.session.forget(self)



class MuxSession(SessionCore):
    """Frames in and out of one TLS leg; the client opens odd stream ids, the server answers them."""

    window_limit = M.INITIAL_WINDOW + CREDIT_THRESHOLD  # a stream's peer beyond this has broken its window

    def __init__(self, tls: TlsLeg, client: bool, on_open: Callable[[Stream, ConnectionFacts], None] | None = None,
                 on_bad_open: Callable[[Stream, str], None] | None = None, gate: "BufferGate | None" = None,
                 identity: str = "") -> None:
        self.tls = tls
        self.gate = gate
        self.budget = gate.budget if gate is not None else None
        self.identity = identity  # the local workload identity whose streams these are (the budget's key)
        self.client = client
        self.on_open = on_open
        self.on_bad_open = on_bad_open
        self.streams: dict[int, Stream] = {}
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.tunnel_blocked = False
        self.goaway = False  # the peer sent GOAWAY: open no new stream here
        self.goaway_sent = False  # we sent one (agent.proxy.inbound: a tunnel whose credential stopped holding)
        self.opened_streams = 0
        self.handshake_reported = False  # the outbound reports a tunnel's handshake on its first flow
        self.peer_valid_until = float("inf")  # unix time the peer's certificate expires (set by the dialer)
        self._decoder = M.FrameDecoder()
        self._next_id = 1 if client else 2

    def start(self) -> "MuxSession":
        """Take the TLS leg over; frames that arrived with the handshake are processed now, so the
        callbacks may run before this returns (they get the stream; ``stream.session`` is this)."""
        self.tls.set_receiver(self)
        compiled = hotpath.compiled
        if compiled is not None and type(self._decoder) is compiled.FrameDecoder \
                and isinstance(self.tls, (TlsLeg, KernelTlsLeg)):
            self.tls.route_frames(self)  # each tunnel read: one compiled call (agent.proxy._hotpath.receive)
        self.tls.resume_reading()
        if self.gate is not None:
            self.gate.join(self)
        return self

    # -- client side ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """May carry a new stream: open, not going away, room for streams, and the peer's certificate
        still valid (TLS checked it once, at the handshake; new streams must not outlive it)."""
        return not self.closed.done() and not self.goaway and len(self.streams) < MAX_STREAMS_PER_SESSION \
            and self._next_id < M.MAX_STREAM_ID - 2 and time.time() < self.peer_valid_until

    async def open(self, request: ConnectionFacts, timeout: float) -> tuple[Stream, StatusReply]:
        """Open a stream for ``request`` and wait for the server's STATUS (which may refuse it)."""
        stream = Stream(self, self._next_id)
        stream.status = status = asyncio.get_running_loop().create_future()
        self._next_id += 2
        self.streams[stream.id] = stream
        self.opened_streams += 1
        self.send(M.encode(M.FrameType.OPEN, stream.id, encode_connect_body(request)))
        try:
            reply = await asyncio.wait_for(asyncio.shield(status), timeout)
        except BaseException:
            stream.reset("no STATUS in time")
            raise
        return stream, reply

    # -- server side ----------------------------------------------------------------------------
    def send_status(self, stream: Stream, reply: StatusReply) -> None:
        self.send(M.encode(M.FrameType.STATUS, stream.id, encode_status_body(reply)))

    # -- sending --------------------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        self.tls.write(frame)

    def send_data(self, stream_id: int, data: bytes) -> None:
        if len(data) < SMALL_WRITE:  # a small message: one frame, one TLS write
            self.tls.write_data_frame(stream_id, data)
            return
        for start in range(0, len(data), M.MAX_FRAME):
            part = data[start:start + M.MAX_FRAME] if len(data) > M.MAX_FRAME else data
            if len(part) < SMALL_WRITE:
                self.tls.write_data_frame(stream_id, part)
            else:  # the header shares the first TLS record with the payload's start: no 12-byte record
                head = SMALL_WRITE - M.HEADER_SIZE
                header = M.encode_header(M.FrameType.DATA, stream_id, len(part))
                self.tls.write_parts(header + part[:head], memoryview(part)[head:])

    def retire(self) -> None:
        """The TLS leg's key nears its usage limit and cannot be renewed (kernel TLS: agent.proxy.kernel_leg): no new
        stream on this tunnel — the client stops opening them (the pool dials another tunnel), the server tells the
        client with GOAWAY. Streams open now go on."""
        if self.client:
            self.goaway = True
        elif not self.goaway_sent:
            self.goaway_sent = True
            self.send(M.encode(M.FrameType.GOAWAY, 0, b"kernel TLS key usage limit: open new streams elsewhere"))

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)

    def close(self, reason: str) -> None:
        """Stop the whole tunnel: every stream is reset."""
        if self.closed.done():
            return
        self._fail_all(ConnectionResetError(f"tunnel closed: {reason}"))
        self.tls.write_eof()
        self.tls.close()
        self.closed.set_result(reason)

    # -- receiving (the TLS leg's receiver) -------------------------------------------------------
    takes_views = True  # leg_data copies what it keeps (FrameDecoder.feed_parts): the TLS leg may reuse its buffer

    def leg_data(self, leg: Leg, data: bytes | memoryview) -> None:
        try:
            for frame in self._decoder.feed_parts(data):
                if frame[0] is _DATA:  # the steady state, as _dispatch would (a tuple index: no attribute lookup)
                    stream = self.streams.get(frame[1])
                    if stream is not None:
                        stream.on_data(frame[2])
                else:
                    self._dispatch(frame)
        except (M.MuxProtocolError, PeerProtocolError) as exc:
            self._refuse(exc)

    def receive_failed(self, exc: Exception) -> None:
        """``TlsLeg.route_frames``: decoding or handing over a frame raised ``exc`` (as in ``leg_data``)."""
        if not isinstance(exc, (M.MuxProtocolError, PeerProtocolError)):
            raise exc
        self._refuse(exc)

    def _refuse(self, exc: Exception) -> None:
        log.warning("closing tunnel from %s: %s", self.tls.peername(), exc)
        self.send(M.encode(M.FrameType.GOAWAY, 0, str(exc).encode()[:M.MAX_CONTROL_PAYLOAD]))
        self.close(f"protocol error: {exc}")

    def _dispatch(self, frame: M.Frame) -> None:
        kind = frame.type
        if kind is M.FrameType.DATA:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.on_data(frame.payload)
            return  # data for a stream just reset: dropped
        if kind is M.FrameType.WINDOW:
            credit = M.window_credit(frame)  # a malformed or zero WINDOW is a protocol error for any stream
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.on_window(credit)
            return
        if kind is M.FrameType.OPEN:
            self._on_open(frame)
        elif kind is M.FrameType.STATUS:
            stream = self.streams.get(frame.stream)
            if stream is not None and stream.status is not None and not stream.status.done():
                stream.status.set_result(decode_status_body(frame.payload))
        elif kind is M.FrameType.FIN:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.on_fin()
        elif kind is M.FrameType.RST:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.on_reset(ConnectionResetError(f"stream reset by peer: "
                                                     f"{frame.payload.decode(errors='replace')}"))
        elif kind is M.FrameType.GOAWAY:
            self.goaway = True

    def _on_open(self, frame: M.Frame) -> None:
        if self.client or frame.stream % 2 == 0 or frame.stream in self.streams:
            raise M.MuxProtocolError(f"unexpected OPEN for stream {frame.stream}")
        if len(self.streams) >= MAX_STREAMS_PER_SESSION:  # a client never opens more (MuxSession.usable)
            raise M.MuxProtocolError(f"OPEN beyond {MAX_STREAMS_PER_SESSION} open streams on one tunnel")
        stream = Stream(self, frame.stream)
        self.streams[stream.id] = stream
        self.opened_streams += 1
        try:
            request = decode_connect_body(frame.payload)
        except PeerProtocolError as exc:
            if self.on_bad_open is not None:
                self.on_bad_open(stream, str(exc))
            return
        if self.on_open is not None:
            self.on_open(stream, request)

    def leg_eof(self, leg: Leg) -> None:
        self.close("peer closed the tunnel")

    def leg_closed(self, leg: Leg, exc: BaseException | None) -> None:
        if self.closed.done():
            return
        self._fail_all(ConnectionResetError(f"tunnel lost: {exc or 'closed'}"))
        self.closed.set_result(str(exc or "closed"))

    def leg_pause_writing(self, leg: Leg) -> None:
        self.tunnel_blocked = True
        for stream in list(self.streams.values()):
            stream.update_writer_blocked()

    def leg_resume_writing(self, leg: Leg) -> None:
        self.tunnel_blocked = False
        for stream in list(self.streams.values()):
            stream.update_writer_blocked()

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self.streams.values()):
            stream.on_reset(exc)
        self.streams.clear()
        if self.gate is not None:
            self.gate.leave(self)


def _established(sock) -> bool:
    """Whether the kernel still has the TCP connection ESTABLISHED (no RST, no FIN from the peer)."""
    if sock is None:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
    except (OSError, ValueError):
        return False


async def wake_ended_forever(gate: "BufferGate", interval: float = WAKE_INTERVAL) -> None:
    """``BufferGate.wake_ended`` every ``interval`` seconds, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            if gate.budget.stalled:
                gate.wake_ended()
        except Exception:  # a task root: one failed round must not end the watch
            log.exception("looking for stalled tunnels whose peer has gone failed")


class BufferGate:
    """The budget's hands on the tunnels: pauses reading on every tunnel of an identity the budget stalls
    (a tunnel that joins while its identity is stalled starts paused), and resumes them when it may take
    again. One per agent, shared by both sides."""

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        budget.on_stall = self._stall
        budget.on_resume = self._resume
        self._sessions: dict[str, set[MuxSession]] = {}
        self._ending: set[MuxSession] = set()  # stalled tunnels whose peer has gone: read to their end

    def join(self, session: MuxSession) -> None:
        self._sessions.setdefault(session.identity, set()).add(session)
        if session.identity in self.budget.stalled:
            session.tls.pause_reading()

    def leave(self, session: MuxSession) -> None:
        self._ending.discard(session)
        sessions = self._sessions.get(session.identity)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[session.identity]

    def _stall(self, identity: str) -> None:
        for session in self._sessions.get(identity, ()):
            if session not in self._ending:
                session.tls.pause_reading()

    def wake_ended(self) -> int:
        """Resume reading on stalled tunnels whose peer has gone (its RST or FIN is in the kernel): the
        session then reads to the end, resets its streams and their bytes go back to the budget. A paused
        tunnel is not watched by the event loop, and the dialling side gives up on a tunnel that has shown
        a zero window for ``proxy.tunnel_timeout_seconds`` (TCP_USER_TIMEOUT covers zero-window probes),
        so without this the bytes would stay held until the idle sweep. Returns how many were woken."""
        woken = 0
        for identity in list(self.budget.stalled):
            for session in list(self._sessions.get(identity, ())):
                if session not in self._ending and not _established(session.tls.socket()):
                    self._ending.add(session)
                    session.tls.resume_reading()
                    woken += 1
        return woken

    def _resume(self, identity: str) -> None:
        for session in self._sessions.get(identity, ()):
            session.tls.resume_reading()
