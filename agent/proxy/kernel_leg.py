"""The tunnel legs of kernel TLS: ``SwitchingTlsLeg`` handshakes and switches, ``KernelTlsLeg`` carries frames.

``SwitchingTlsLeg`` is a TlsLeg (the same handshake over memory BIOs) with two differences while it
handshakes: every read is cut at the current TLS record's end (``get_buffer`` returns a view of exactly the
rest of the record: its 5-byte header, then its body — agent.proxy.tls_records.RecordCutter), so no byte after
the peer's last handshake record enters user space; and it notes the ClientHello random (from the bytes it
writes as the client, or reads as the server). When the handshake completes it checks that nothing is left
in user space (incoming BIO empty, no plaintext pending, the cut at a record boundary, the outgoing BIO flushed),
waits until the transport's write buffer is empty (the kernel must encrypt nothing that was already sent),
installs the keys (agent.proxy.kernel_tls.install) and becomes a ``KernelTlsLeg`` (``__class__`` assignment:
the same object, so the proxies' references stay valid) before ``handshake_done`` resolves: no frame is ever
written or read by user-space TLS. A switch that fails closes the tunnel (``KernelTlsError``), never continues it.

No post-handshake message can arrive between the handshake and the switch: tunnel servers send no session
tickets (``num_tickets = 0``), clients ask for none (``OP_NO_TICKET``), no context enables post-handshake
authentication, and tcpmesh never sends a KeyUpdate. Should a peer send any non-data record after the switch
(an alert, a KeyUpdate), the kernel fails the read with EIO: the tunnel ends, as at close_notify.

``KernelTlsLeg`` writes frames straight to the transport (the kernel seals them) and hands what it reads to
the session as plaintext; a close sends close_notify as an alert record; EIO on a read is the peer ending the
tunnel; EBADMSG (a record that fails authentication) loses the tunnel with nothing of it delivered. It counts
the AES blocks its key has sealed and retires the tunnel before RFC 8446 §5.5's limit (no new stream at
``tls_records.RETIRE_BLOCKS``, closed at ``CLOSE_BLOCKS``): the kernels cannot rekey. The compiled relay steps
(agent/proxy/_hotpath.c ``relay_send`` and ``receive``) take this leg as they take a TlsLeg, minus the sealing and
opening: they see no SSL object and no BIO (``_sslobj``, ``_outgoing`` None) and move the frames in plaintext.

``KernelTls`` is the agent's state: the setting, whether kernel TLS is in use and why (not), the tunnels by
implementation, and the failures; its ``leg`` makes each tunnel leg. ``auto`` falls back to user-space TLS for
good, with one error line, when a switch fails half-way (that tunnel is closed: fail closed, the pool dials
again); ``on`` keeps trying.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from typing import Callable

from agent.proxy import hotpath
from agent.proxy import mux as M
from agent.proxy import tls_records as R
from agent.proxy.endpoints import SMALL_VIEW, Leg, TlsLeg, _read_buffers
from agent.proxy.kernel_tls import KernelTlsError, ended_by_peer, install, keys_for, send_close_notify
from agent.proxy.state import TlsCore

log = logging.getLogger("tcpmesh.kernel_tls")
DRAIN_POLL_SECONDS = 0.002
KERNEL, USER = "kernel", "user"


class SwitchingTlsLeg(TlsLeg):
    """A tunnel leg that handshakes in user space and switches to kernel TLS at the handshake's end."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None,
                 admit=None, *, kernel: "KernelTls") -> None:
        super().__init__(context, server_side, server_hostname, admit)
        assert kernel.keylog is not None
        self._kernel = kernel
        kernel.keylog.adopt(context)  # the server's per-identity contexts: IdentityStore's context hook
        self._cutter = R.RecordCutter()
        self._first = bytearray()  # the server's first bytes read, up to the ClientHello random
        self._random: bytes | None = None
        self._record = memoryview(bytearray(R.RECORD_HEADER + R.MAX_RECORD_BODY))

    # -- reading the handshake record by record ----------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._record[:min(self._cutter.want(), len(self._record))]

    def buffer_updated(self, nbytes: int) -> None:
        data = self._record[:nbytes]
        self._cutter.took(data)
        if self._server_side and self._random is None and len(self._first) < 64:
            self._first += data[:64 - len(self._first)]
            self._random = R.client_random(self._first)
        self.data_received(data)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.handshake_done.done():  # a byte after the handshake that the switch did not take: fail closed
            self._switch_failed(KernelTlsError("data arrived after the handshake before the switch"))
            return
        self._incoming.write(data)
        self._handshake()

    def _flush(self) -> None:
        transport = self.transport
        if self._outgoing.pending and transport is not None and not transport.is_closing():
            data = self._outgoing.read()
            if self._random is None and not self._server_side:
                self._random = R.client_random(data)
            transport.write(data)

    # -- the switch --------------------------------------------------------------------------------
    def _handshake_complete(self) -> None:
        """Switch before ``handshake_done`` resolves: nobody writes a frame before the kernel has the keys."""
        try:
            if self._incoming.pending or self.ssl_object.pending() or not self._cutter.at_boundary:  # type: ignore[union-attr]
                raise KernelTlsError("bytes after the handshake's last record were read into user space")
            if self._outgoing.pending:
                raise KernelTlsError("the handshake's last flight was not flushed")
            tx, rx = keys_for(self._kernel.keylog, self._random, self.ssl_object, self._server_side)  # type: ignore[arg-type]
        except (KernelTlsError, R.KeyScheduleError) as exc:
            self._switch_failed(exc if isinstance(exc, KernelTlsError) else KernelTlsError(str(exc)))
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            self._switch_failed(KernelTlsError("the connection closed during the switch"), counts=False)
            return
        if transport.get_write_buffer_size():  # the kernel must seal nothing that was sent in user space
            transport.pause_reading()
            asyncio.get_running_loop().call_later(DRAIN_POLL_SECONDS, self._switch_when_drained, tx, rx)
            return
        self._install(tx, rx)

    def _switch_when_drained(self, tx: bytes, rx: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.handshake_done.done():
            if not self.handshake_done.done():
                self._switch_failed(KernelTlsError("the connection closed during the switch"), counts=False)
            return
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(DRAIN_POLL_SECONDS, self._switch_when_drained, tx, rx)
            return
        self._install(tx, rx)
        if self.handshake_done.done() and self.handshake_done.exception() is None:
            transport.resume_reading()

    def _install(self, tx: bytes, rx: bytes) -> None:
        sock = self.transport.get_extra_info("socket")  # type: ignore[union-attr]
        try:
            install(sock.fileno(), tx, rx)
        except (OSError, ValueError) as exc:
            self._switch_failed(KernelTlsError(f"the kernel refused the keys: {exc}"))
            return
        del tx, rx
        self._sslobj = self._incoming = self._outgoing = None  # what the compiled steps look for: none here
        del self._record, self._cutter, self._first  # the handshake's read state (16 KiB) is not needed any more
        self.__class__ = KernelTlsLeg  # type: ignore[assignment]
        # uvloop keeps the bound get_buffer / buffer_updated / data_received it found when the protocol was set:
        # set it again, so the transport reads with the kernel leg's methods from the next read on
        self.transport.set_protocol(self)  # type: ignore[union-attr]
        self._blocks = 0  # AES blocks sealed with this key (an upper bound: tls_records.gcm_blocks)
        self._limit = R.RETIRE_BLOCKS
        self.handshake_done.set_result(None)

    def _switch_failed(self, exc: KernelTlsError, counts: bool = True) -> None:
        """Close the tunnel (never continued in user space); ``counts``: a failure of the switch itself (KernelTls
        logs it and, under auto, stops using kernel TLS), not a peer that went away meanwhile."""
        if counts:
            self._kernel.switch_failed(exc, self.peername())
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
        self.reset()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake_done.done():
            self._kernel.keylog.forget(self._random)  # type: ignore[union-attr]
        super().connection_lost(exc)


class KernelTlsLeg(Leg, TlsCore):
    """A tunnel leg whose records the kernel seals and opens: plaintext frames in and out. Only ever made from a
    ``SwitchingTlsLeg`` (``__class__`` assignment), whose attributes it keeps (``ssl_object`` for the peer's
    certificate and ALPN, ``handshake_done``, ``handshake_seconds``)."""

    # -- reading: plaintext --------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffers.view or _read_buffers.shared()

    def buffer_updated(self, nbytes: int) -> None:
        view = (_read_buffers.view or _read_buffers.shared())[:nbytes]
        session = self._frames
        if session is not None and self.receiver is session:  # route_frames: decoded and handed over in one call
            try:
                hotpath.compiled.receive(self, None, None, view, view, session._decoder, session.streams,  # type: ignore[union-attr]
                                         session._dispatch, session.window_limit, SMALL_VIEW)
            except Exception as exc:  # a frame the session refuses: it decides (GOAWAY, close) or re-raises
                session.receive_failed(exc)
            return
        self._deliver_view(view)

    def route_frames(self, session) -> None:
        """As ``TlsLeg.route_frames`` (only with the compiled path): each read is decoded and handed to ``session``'s
        streams in one compiled call (agent.proxy._hotpath.receive with no SSL object: the kernel has opened the
        records already); ``MuxSession.leg_data`` stays the reference."""
        self._frames = session

    def view_received(self, view: memoryview) -> None:
        self._deliver_view(view)

    def data_received(self, data: bytes | memoryview) -> None:
        self._deliver(data)

    def eof_received(self) -> bool:
        self._deliver_eof()  # a TCP FIN without close_notify: end of stream, as in user space
        return not self.eof_sent

    def connection_lost(self, exc: Exception | None) -> None:
        if ended_by_peer(exc):  # a non-data record (close_notify, an alert, a KeyUpdate): the peer ended the tunnel
            self._deliver_eof()
            exc = None
        elif isinstance(exc, OSError) and exc.errno == errno.EBADMSG:
            log.warning("kernel TLS: a record from %s failed authentication (EBADMSG): tunnel lost, nothing of it "
                        "delivered", self.peername())
        Leg.connection_lost(self, exc)

    # -- writing: the kernel seals ---------------------------------------------------------------------
    # Every write hands the transport bytes of its own: what a caller passes may be a view of a reused buffer
    # (agent.proxy.endpoints' zero-copy discipline), and a transport keeps what the socket cannot take now.
    def write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.eof_sent:
            return
        self.bytes_written += len(data)
        transport.write(bytes(data) if type(data) is memoryview else data)
        self._sealed(len(data))

    def write_data_frame(self, stream: int, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.eof_sent:
            return
        size = M.HEADER_SIZE + len(data)
        self.bytes_written += size
        transport.write(M.encode_header(M.FrameType.DATA, stream, len(data)) + data)
        self._sealed(size)

    def write_parts(self, *parts: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.eof_sent:
            return
        data = b"".join(parts)  # one copy: the parts may be views of a reused buffer
        self.bytes_written += len(data)
        transport.write(data)
        self._sealed(len(data))

    def write_eof(self) -> None:
        """close_notify as an alert record (when nothing is still queued before it), then a TCP FIN."""
        transport = self.transport
        if self.eof_sent or transport is None or transport.is_closing():
            return
        self.eof_sent = True
        sock = transport.get_extra_info("socket")
        if sock is not None and not transport.get_write_buffer_size():
            try:
                send_close_notify(sock.fileno())
            except (OSError, ValueError):
                pass  # the FIN still ends the tunnel: a peer reads it as end of stream
        if transport.can_write_eof():
            transport.write_eof()

    def _sealed(self, size: int) -> None:
        self._blocks += R.gcm_blocks(size)
        if self._blocks >= self._limit:
            self._limit_reached()

    def _limit_reached(self) -> None:
        """RFC 8446 §5.5 (the kernel cannot rekey): at RETIRE_BLOCKS no new stream goes on this tunnel (the pool
        dials another), at CLOSE_BLOCKS it is closed."""
        receiver = self.receiver
        if self._limit == R.RETIRE_BLOCKS:
            self._limit = R.CLOSE_BLOCKS
            log.info("kernel TLS: the tunnel with %s is retiring (its key sealed 2^33 AES blocks, half of AES-GCM's "
                     "limit): no new stream on it", self.peername())
            retire = getattr(receiver, "retire", None)
            if retire is not None:
                retire()
            return
        self._limit = float("inf")
        log.warning("kernel TLS: the tunnel with %s reached AES-GCM's limit (RFC 8446 §5.5) and cannot rekey in the "
                    "kernel: closed", self.peername())
        close = getattr(receiver, "close", None)
        if close is not None:
            close("kernel TLS key usage limit")
        else:
            self.close()

    @property
    def alpn(self) -> str | None:
        return self.ssl_object.selected_alpn_protocol() if self.ssl_object else None


class KernelTls:
    """The agent's kernel TLS: setting, whether in use (and why), tunnels by implementation, failures."""

    def __init__(self, setting: str, keylog: KeyLog | None, reason: str) -> None:
        self.setting = setting  # proxy.kernel_tls: auto | on | off
        self.keylog = keylog
        self.active = keylog is not None
        self.reason = reason  # why kernel TLS is (not) in use, for the log, `tcpmesh status` and doctor
        self.open = {KERNEL: 0, USER: 0}  # tunnels open now, by who runs their TLS
        self.established = {KERNEL: 0, USER: 0}
        self.switch_failures = 0

    @classmethod
    def off(cls, reason: str = "proxy.kernel_tls is off") -> "KernelTls":
        return cls("off", None, reason)

    def leg(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None,
            admit: Callable | None = None):
        """A tunnel leg: one that switches to kernel TLS when in use, else today's user-space leg."""
        if self.active:
            return SwitchingTlsLeg(context, server_side, server_hostname, admit, kernel=self)
        return TlsLeg(context, server_side, server_hostname, admit)

    def adopt(self, context: ssl.SSLContext) -> None:
        """IdentityStore's context hook: contexts built while kernel TLS is in use log their secrets."""
        if self.active and self.keylog is not None:
            self.keylog.adopt(context)

    def track(self, session) -> str:
        """Count a started tunnel (a MuxSession) by implementation until it closes; returns which."""
        kind = KERNEL if isinstance(session.tls, KernelTlsLeg) else USER
        self.open[kind] += 1
        self.established[kind] += 1

        def closed(_) -> None:
            self.open[kind] -= 1
        session.closed.add_done_callback(closed)
        return kind

    def switch_failed(self, exc: BaseException, peer: object) -> None:
        """A tunnel could not switch (it is closed). auto: no kernel TLS for this agent from now on."""
        self.switch_failures += 1
        if self.setting == "auto" and self.active:
            self.active = False
            if self.keylog is not None:
                self.keylog.release()  # no context logs secrets any more
            self.reason = (f"a tunnel's switch to kernel TLS failed ({exc}); user-space TLS from now on "
                           f"(proxy.kernel_tls auto; restart the agent to try again)")
            log.error("kernel TLS: switching the tunnel with %s failed: %s — that tunnel was closed, and every "
                      "tunnel from now on runs user-space TLS (proxy.kernel_tls auto; restart to try again)", peer, exc)
        else:
            log.error("kernel TLS: switching the tunnel with %s failed: %s — that tunnel was closed "
                      "(proxy.kernel_tls %s)", peer, exc, self.setting)

    def describe(self) -> dict:
        """For `tcpmesh status`: the setting, what runs, why, and the tunnels by implementation."""
        return {"setting": self.setting, "in_use": KERNEL if self.active else USER, "reason": self.reason,
                "open": dict(self.open), "established": dict(self.established),
                "switch_failures": self.switch_failures}
