"""The two kinds of relay leg: plain TCP and TLS over TCP, as asyncio (buffered) Protocols.

A leg hands what it reads to its ``receiver`` (a header reader during setup, then the relay) and
accepts ``write`` / ``write_eof`` / flow-control calls. The TLS leg runs TLS itself over memory BIOs
(``ssl.SSLObject``) because asyncio's own SSL transport cannot half-close: here ``write_eof`` sends
close_notify and the leg keeps reading until the peer's close_notify (TLS 1.3 half-close).

Zero-copy discipline of the data path: sockets are read into one buffer shared by every leg of the
thread (``READ_BUFFER``, consumed before the next read), TLS legs decrypt into another
(``READ_CHUNK``), and a receiver with ``takes_views`` gets views of them — so every ``write`` must
copy what it keeps past its return: ``PlainLeg.write`` hands a view straight to the kernel when
nothing is queued and copies only what the socket did not take.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Protocol

from agent.proxy import hotpath
from agent.proxy import mux as M
from agent.proxy.state import LegCore, PlainCore, TlsCore

READ_CHUNK = 256 * 1024  # plaintext decrypted by a TLS leg per delivery (shared, see the module docstring)
READ_BUFFER = 1024 * 1024  # one read from a socket (shared)
MAX_BUFFERED_BEFORE_RECEIVER = 256 * 1024
SMALL_VIEW = 64 * 1024  # PlainLeg.write copies a view this small instead of writing it to the socket itself
SMALL_WRITE = 16 * 1024  # below this a stream's frame header and its payload go out in one TLS write


class _SharedBuffer(threading.local):
    """One buffer per thread that runs an event loop, allocated at first use. ``take`` hands out a
    private one if the shared one is still in use further up the stack (a re-entrant delivery)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.view: memoryview | None = None
        self.busy = False

    def shared(self) -> memoryview:
        """The thread's buffer, for a user that consumes it before anyone asks again (socket reads)."""
        view = self.view
        if view is None:
            view = self.view = memoryview(bytearray(self.size))
        return view

    def take(self) -> memoryview:
        """The thread's buffer, marked in use until ``give_back`` (a private one while it is)."""
        if self.busy:
            return memoryview(bytearray(self.size))
        self.busy = True
        return self.view or self.shared()  # the attribute once it exists: no call

    def give_back(self, view: memoryview) -> None:
        if view is self.view:
            self.busy = False


_read_buffers = _SharedBuffer(READ_BUFFER)  # socket reads: consumed before the loop reads again
_plain_buffers = _SharedBuffer(READ_CHUNK)  # TLS legs' plaintext: consumed within one delivery


class Receiver(Protocol):
    def leg_data(self, leg: "Leg", data: bytes) -> None: ...
    def leg_eof(self, leg: "Leg") -> None: ...
    def leg_closed(self, leg: "Leg", exc: BaseException | None) -> None: ...
    def leg_pause_writing(self, leg: "Leg") -> None: ...
    def leg_resume_writing(self, leg: "Leg") -> None: ...


class FrameRoute(Receiver, Protocol):
    """A TLS leg's receiver whose frames come straight from a compiled read (``TlsLeg.route_frames``):
    agent.proxy.session.MuxSession."""
    _decoder: object
    streams: dict
    window_limit: int  # the most a stream's peer may have sent beyond the credit returned
    def _dispatch(self, frame) -> None: ...
    def receive_failed(self, exc: Exception) -> None: ...


class Leg(LegCore, asyncio.BufferedProtocol):
    """Common state: transport, receiver (with buffering until one is set), byte counts (the steady-state
    fields in ``LegCore``: agent.proxy.state)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.receiver: Receiver | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.peer_eof = False
        self.eof_sent = False
        self.lost = False
        self.close_exc: BaseException | None = None
        self._pending: list[bytes] | None = None  # what arrived before a receiver was set (created at first use)
        self._pending_size = 0
        self._pending_eof = False
        self._pending_closed: tuple[BaseException | None] | None = None

    # -- asyncio side -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already set: asyncio's and uvloop's TCP transports both set it on every socket
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.close_exc = exc
        if self.receiver is not None:
            self.receiver.leg_closed(self, exc)
        else:
            self._pending_closed = (exc,)

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.leg_pause_writing(self)

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.leg_resume_writing(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffers.view or _read_buffers.shared()  # the attribute once it exists: no call

    def buffer_updated(self, nbytes: int) -> None:
        self.view_received((_read_buffers.view or _read_buffers.shared())[:nbytes])

    def view_received(self, view: memoryview) -> None:
        """``nbytes`` read into the shared buffer; the view is valid until this returns."""
        raise NotImplementedError

    # -- delivery to the receiver -------------------------------------------------------------
    def _deliver_view(self, view: memoryview) -> None:
        """Deliver a view of a reused buffer: as it is to a receiver that ``takes_views`` (it copies what
        it keeps), as bytes to any other. (``_deliver`` inlined for the steady state: one call less per
        message.)"""
        receiver = self.receiver
        if receiver is None:
            self._deliver(view)  # buffered: copied there
        elif getattr(receiver, "takes_views", False):
            self.bytes_read += len(view)
            receiver.leg_data(self, view)
        else:
            self._deliver(bytes(view))

    def _deliver(self, data: bytes | memoryview) -> None:
        self.bytes_read += len(data)
        if self.receiver is not None:
            self.receiver.leg_data(self, data)
            return
        if self._pending is None:
            self._pending = []
        self._pending.append(bytes(data))  # a view of a reused buffer must not be kept
        self._pending_size += len(data)
        if self._pending_size > MAX_BUFFERED_BEFORE_RECEIVER and self.transport is not None:
            self.transport.pause_reading()

    def _deliver_eof(self) -> None:
        if self.peer_eof:
            return
        self.peer_eof = True
        if self.receiver is not None:
            self.receiver.leg_eof(self)
        else:
            self._pending_eof = True

    def set_receiver(self, receiver: Receiver) -> None:
        """Attach a receiver and replay what arrived before it (data, then EOF, then close).

        A receiver may detach itself while data is replayed (a header reader that got its message);
        what it has not consumed stays buffered for the next receiver.
        """
        self.receiver = receiver
        pending = self._pending
        while pending and self.receiver is receiver:
            chunk = pending.pop(0)
            self._pending_size -= len(chunk)
            receiver.leg_data(self, chunk)
        if self.receiver is not receiver or pending:
            return
        self._pending = None
        if self._pending_eof:
            self._pending_eof = False
            receiver.leg_eof(self)
        if self._pending_closed is not None and self.receiver is receiver:
            (exc,) = self._pending_closed
            self._pending_closed = None
            receiver.leg_closed(self, exc)

    def detach_receiver(self) -> None:
        """Stop delivering; events are buffered until the next ``set_receiver``."""
        self.receiver = None

    # -- control ------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Abort with a TCP RST, so the peer sees a prompt ECONNRESET instead of a clean close."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, ValueError):  # uvloop raises ValueError once the socket is already closed
                pass
        self.transport.abort()

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def write_buffer_size(self) -> int:
        """Bytes written to this leg that its transport still holds (the kernel has not taken them yet)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def socket(self) -> socket.socket | None:
        return self.transport.get_extra_info("socket") if self.transport else None

    def peername(self) -> tuple[str, int] | None:
        return self.transport.get_extra_info("peername") if self.transport else None


class PlainLeg(Leg, PlainCore):
    """A plain TCP connection: the application's socket, or an upstream workload.

    ``on_connected(leg)`` runs once the transport is there (an accepting server's hook: one shared
    callable instead of a future and a closure per connection)."""

    def __init__(self, start_paused: bool = False,
                 on_connected: "Callable[[PlainLeg], None] | None" = None) -> None:
        super().__init__()
        self._start_paused = start_paused
        self._on_connected = on_connected
        self._fd = -1  # the socket's descriptor, looked up at the first write of a view

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._start_paused:
            transport.pause_reading()  # type: ignore[attr-defined]
        if self._on_connected is not None:
            on_connected, self._on_connected = self._on_connected, None
            on_connected(self)

    def view_received(self, view: memoryview) -> None:
        self._deliver_view(view)

    def buffer_updated(self, nbytes: int) -> None:
        compiled = hotpath.compiled  # relayed to a stream and sealed into its tunnel in one call when it all goes now
        if compiled is not None and compiled.relay_send(self, _read_buffers.view, nbytes, SMALL_WRITE):
            return
        receiver = self.receiver  # view_received and _deliver_view without their calls
        if receiver is not None and getattr(receiver, "takes_views", False):
            self.bytes_read += nbytes
            receiver.leg_data(self, (_read_buffers.view or _read_buffers.shared())[:nbytes])
        else:
            self._deliver_view((_read_buffers.view or _read_buffers.shared())[:nbytes])

    def data_received(self, data: bytes) -> None:
        self._deliver(data)

    def eof_received(self) -> bool:
        self._deliver_eof()
        return True  # keep our sending side open: half-close

    def write(self, data: bytes | memoryview) -> None:
        # a small DATA part from a stream takes the compiled twin (agent/proxy/_hotpath.c stream_deliver)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.bytes_written += len(data)
        if type(data) is memoryview:  # a reused buffer: the transport must not keep it
            # a small one is copied: as cheap as the extra call, and a connection that only ever
            # exchanges small messages never needs its socket object (~70 B per connection)
            data = bytes(data) if len(data) < SMALL_VIEW else self._send_view(transport, data)
            if not data:
                return
        transport.write(data)

    def _send_view(self, transport: asyncio.Transport, view: memoryview) -> bytes:
        """Write ``view`` to the socket now if nothing is queued; return a copy of what is left for the
        transport (all of it while the transport still holds earlier data, or on any error, which the
        transport then meets and reports itself)."""
        if transport.get_write_buffer_size() == 0:
            if self._fd < 0:
                sock = transport.get_extra_info("socket")
                self._fd = sock.fileno() if sock is not None else -1
            if self._fd >= 0:
                try:
                    sent = os.write(self._fd, view)
                except OSError:  # EAGAIN, or an error the transport will report
                    sent = 0
                if sent == len(view):
                    return b""
                view = view[sent:]
        return bytes(view)

    def write_eof(self) -> None:
        if self.eof_sent or self.transport is None or self.transport.is_closing():
            return
        self.eof_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()


class TlsLeg(Leg, TlsCore):
    """TLS 1.3 over a TCP transport, run on memory BIOs so that half-close works.

    ``admit(leg)`` (an accepting server's hook) runs once the transport is there, before any TLS state
    is made: False means the connection was refused (reset) and the leg does nothing more."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None,
                 admit: "Callable[[TlsLeg], bool] | None" = None) -> None:
        super().__init__()
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._admit = admit
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object: ssl.SSLObject | None = None
        self._sslobj = None  # its C object (what the compiled steps call), set with it
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake_seconds: float | None = None  # TCP connected → TLS handshake complete
        self._connected_at = 0.0
        self._frames: FrameRoute | None = None  # route_frames: the session whose frames go the compiled way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._admit is not None and not self._admit(self):
            self.handshake_done.cancel()  # nobody waits for it: no "exception never retrieved" per refusal
            return
        self._connected_at = time.monotonic()
        try:
            self.ssl_object = self._context.wrap_bio(self._incoming, self._outgoing,
                                                     server_side=self._server_side,
                                                     server_hostname=self._server_hostname)
            self._sslobj = self.ssl_object._sslobj
        except (ssl.SSLError, ValueError) as exc:
            self._fail_handshake(exc)
            return
        self._handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc or ConnectionResetError("connection closed during TLS handshake"))
        super().connection_lost(exc)

    def view_received(self, view: memoryview) -> None:
        self.data_received(view)  # the memory BIO copies it

    def buffer_updated(self, nbytes: int) -> None:
        view = (_read_buffers.view or _read_buffers.shared())[:nbytes]
        if self._frames is not None and self.receiver is self._frames:
            self._receive_frames(self._frames, view)
        else:
            self.data_received(view)  # view_received without its own call

    def route_frames(self, session: "FrameRoute") -> None:
        """From now on (while ``session`` is the receiver) hand each read to ``agent.proxy._hotpath.receive``:
        decrypt, decode and deliver to ``session``'s streams in one compiled call. Only with the compiled
        path and an established tunnel; the steps it replaces (``data_received`` → ``_decrypt_into`` →
        the receiver's ``leg_data``) stay the reference."""
        if self.handshake_done.done() and self.handshake_done.exception() is None and self.ssl_object is not None:
            self._frames = session

    def _receive_frames(self, session: "FrameRoute", data: memoryview | None) -> None:
        receive = hotpath.compiled.receive  # type: ignore[union-attr]
        sslobj = self._sslobj
        view = _plain_buffers.take()
        try:
            while True:
                try:
                    state = receive(self, sslobj, self._incoming, data, view, session._decoder, session.streams,
                                    session._dispatch, session.window_limit, SMALL_VIEW)  # counts in self.bytes_read
                except ssl.SSLError as exc:
                    self._flush()
                    self.close_exc = exc
                    self.reset()
                    return
                except Exception as exc:  # a frame the session refuses: it decides (GOAWAY, close) or re-raises
                    session.receive_failed(exc)
                    return
                if state != 1:  # 1: the buffer was full
                    break
                data = None
                if self.transport is None or self.transport.is_closing():
                    return  # the receiver closed the tunnel
        finally:
            _plain_buffers.give_back(view)
        if self._outgoing.pending:  # post-handshake messages (key updates) may need an answer
            self._flush()
        if state == 2:
            self._deliver_eof()

    def data_received(self, data: bytes | memoryview) -> None:
        self._incoming.write(data)
        if not self.handshake_done.done():
            self._handshake()
            if not self.handshake_done.done() or self.handshake_done.exception() is not None:
                return
        self._read_plaintext()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if not self.handshake_done.done():
            self._fail_handshake(ConnectionResetError("peer closed the connection during the TLS handshake"))
            return False
        self._read_plaintext()
        self._deliver_eof()  # a TCP FIN without close_notify is treated as end of stream
        return not self.eof_sent

    def _handshake(self) -> None:
        assert self.ssl_object is not None
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # send the alert, if any
            self._fail_handshake(exc)
            return
        self._flush()
        self.handshake_seconds = time.monotonic() - self._connected_at
        self._handshake_complete()

    def _handshake_complete(self) -> None:
        """The handshake is done (the kernel TLS leg switches here first: agent.proxy.kernel_leg)."""
        self.handshake_done.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _read_plaintext(self) -> None:
        """Decrypt everything received into the shared plaintext buffer and hand it over (one view per
        full buffer): no allocation per TLS record and no joining copy. A receiver with ``takes_views``
        gets the view itself and must copy what it keeps; any other receiver gets bytes."""
        assert self.ssl_object is not None
        view = _plain_buffers.take()
        try:
            self._decrypt_into(view)
        finally:
            _plain_buffers.give_back(view)

    def _decrypt_into(self, view: memoryview) -> None:
        if hotpath.compiled is not None:
            self._decrypt_into_compiled(hotpath.compiled.decrypt, view)
            return
        ssl_object = self.ssl_object
        read = ssl_object.read  # type: ignore[union-attr]
        incoming = self._incoming
        size = len(view)
        filled = 0
        eof = False
        while True:
            if filled and not incoming.pending and not ssl_object.pending():  # type: ignore[union-attr]
                # nothing left to decrypt: a further read would only raise SSLWantReadError, and
                # building that exception (its message, library and reason) is the costliest step of
                # a small message's receive path
                break
            try:
                n = read(size - filled, view[filled:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                self._flush()
                self.close_exc = exc
                self.reset()
                return
            if not n:
                eof = True
                break
            filled += n
            if filled == size:
                self._deliver_plain(view, filled)
                filled = 0
                if self.transport is None or self.transport.is_closing():
                    return  # the receiver closed the tunnel
        self._flush()  # post-handshake messages (key updates) may need an answer
        if filled:
            self._deliver_plain(view, filled)
        if eof:
            self._deliver_eof()

    def _decrypt_into_compiled(self, decrypt, view: memoryview) -> None:
        """``_decrypt_into`` with its read loop in agent.proxy._hotpath (the same steps, the same outcomes)."""
        sslobj = self._sslobj
        incoming = self._incoming
        filled = state = 0
        while True:
            try:
                filled, state = decrypt(sslobj, incoming, view, filled)
            except ssl.SSLError as exc:
                self._flush()
                self.close_exc = exc
                self.reset()
                return
            if state != 1:  # 1: the buffer is full
                break
            self._deliver_plain(view, filled)
            filled = 0
            if self.transport is None or self.transport.is_closing():
                return  # the receiver closed the tunnel
        self._flush()
        if filled:
            self._deliver_plain(view, filled)
        if state == 2:
            self._deliver_eof()

    def _deliver_plain(self, view: memoryview, size: int) -> None:
        self._deliver_view(view[:size])

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._outgoing.read())

    def write(self, data: bytes | memoryview) -> None:
        if self.ssl_object is None or self.transport is None or self.transport.is_closing() or self.eof_sent:
            return
        self.bytes_written += len(data)
        self.ssl_object.write(data)
        self._flush()

    def write_data_frame(self, stream: int, data: bytes | memoryview) -> None:
        """One tcpmesh/2 DATA frame (at most ``mux.MAX_FRAME`` bytes), its header and payload in one TLS
        write, flushed: compiled in one call (agent.proxy._hotpath.seal_data) or as the pure-Python steps."""
        transport = self.transport
        if self.ssl_object is None or transport is None or transport.is_closing() or self.eof_sent:
            return
        self.bytes_written += M.HEADER_SIZE + len(data)
        compiled = hotpath.compiled
        if compiled is not None:
            records = compiled.seal_data(self._sslobj, self._outgoing, stream, data)
            if records:
                transport.write(records)
            return
        self.ssl_object.write(M.encode_header(M.FrameType.DATA, stream, len(data)) + data)
        self._flush()

    def write_parts(self, *parts: bytes) -> None:
        """Write several buffers as consecutive TLS records, flushing once (no concatenation copy)."""
        if self.ssl_object is None or self.transport is None or self.transport.is_closing() or self.eof_sent:
            return
        for part in parts:
            self.bytes_written += len(part)
            self.ssl_object.write(part)
        self._flush()

    def write_eof(self) -> None:
        """Send close_notify (and a TCP FIN); keep reading what the peer still sends."""
        if self.eof_sent or self.ssl_object is None or self.transport is None or self.transport.is_closing():
            return
        self.eof_sent = True
        try:
            self.ssl_object.unwrap()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass
        self._flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()

    @property
    def alpn(self) -> str | None:
        return self.ssl_object.selected_alpn_protocol() if self.ssl_object else None
