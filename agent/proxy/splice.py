"""The same-node kernel splice (bpf/splice.c; ``proxy.same_node: splice``): once the same-node path
(agent.proxy.local) has authorized and recorded a connection and the workload accepted it, the
client's accepted socket and the workload socket are joined in the kernel, and their bytes no longer
enter the agent.

``KernelSplice`` is the agent's handle on the program:
  - ``load()``: adopt the program and maps pinned under the capture's ``bpffs_dir`` (``splice-*``
    directories) or have the loader process (agent.bpf.loader; the agent never imports bcc) compile
    and pin them first, then attach the sk_skb stream verdict to the sockhash. Any failure raises:
    the caller falls back to the user-space relay, loudly (``splice_from_config``);
  - ``join(a, b)``: put both sockets in ``tcpmesh_splice_peers``, crosswise (each under the other's
    cookie), then make the kernel run the verdict over what is already queued (below);
  - ``part(a_cookie, b_cookie)``: delete both entries (the kernel also drops a socket when it closes);
  - ``entries()`` / ``counters()``: what the map holds and the verdict's reason counters.

``SplicedPair`` is what a ``Relay`` is for the user-space path — the entry of ``ctx.relays`` both
records read (``a``, ``b``, ``a_to_b``, ``b_to_a``, ``done``, ``abort``) — for a spliced pair:

- **Ordering at the switch-over.** Both legs are paused from accept and connect on: user space has
  read no byte of either socket when they are joined. Bytes that arrived before the join sit in the
  socket's receive queue; on this kernel (6.18, and 5.10/6.1 the same: ``sk_psock_verdict_data_ready``
  reads the queue from its head) the verdict runs over them, in order and before anything later, at
  the socket's next data-ready. A client that sent its request and now waits (PostgreSQL, Redis)
  makes no next data-ready, so ``join`` makes one: ``SO_RCVLOWAT`` 1 calls ``tcp_data_ready``, which
  runs the verdict when the queue holds data. No byte is ever read in user space before the switch,
  so there is nothing for the kernel's bytes to overtake (docs/performance-latency.md "The kernel splice").
- **Half-close and resets.** A spliced socket is never read in user space (a read would race the
  verdict for the receive queue): its leg stays paused, and ``SocketEnds`` asks the kernel only
  for its ends — ``EPOLLRDHUP`` (the peer's FIN), ``EPOLLERR`` (a reset). A FIN on one socket becomes
  ``shutdown(SHUT_WR)`` on the other only once every byte the first received has entered the
  other's send queue (its ``tcpi_bytes_acked`` + ``SIOCOUTQ``, less what they said at the join —
  the SYN on some sockets — cover the first's ``tcpi_bytes_received``, less its FIN): the kernel's redirect backlog is not visible
  otherwise, and a FIN before it would cut the stream. An error resets both, as the relay does.
- **Byte counts** come from the kernel: each socket's ``tcpi_bytes_received`` (less its FIN), live
  for ``tcpmesh flows`` and frozen when the pair ends.

Must not import agent.proxy.local (which imports this), agent.telemetry or bcc.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import select
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable

from agent.bpf import pins, sources
from agent.bpf.counters import read_reason_counters
from agent.bpf.errors import AttachError
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import DEFAULT_TIMEOUT, LoadRequest, PinTo, Program
from agent.bpf.pinned import PinnedSet, adopt_or_pin
from agent.errors import TcpmeshError
from agent.proxy import splice_abi as abi
from agent.proxy.endpoints import Leg
from agent.proxy.relay import RelayResult

log = logging.getLogger("tcpmesh.splice")

SOURCE_NAME = "splice.c"
HEADERS = ("splice/abi.h", "splice/maps.h")
PROGRAM = "tcpmesh_splice"
PROG_SK_SKB = 14
ATTACH_SK_SKB_STREAM_VERDICT = 5
PIN_PREFIX = "splice-"
LAYOUT_VERSION = 1
PEERS, COUNTERS = "tcpmesh_splice_peers", "tcpmesh_splcnt"
REASON_NAMES = tuple(abi.REASONS[code] for code in range(len(abi.REASONS)))

SO_COOKIE = 57
TCP_INFO = 11
TCP_INFO_LEN = 136
TCPI_BYTES_ACKED = 120     # offsetof(struct tcp_info, tcpi_bytes_acked), stable UAPI since 4.1
TCPI_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received)
SIOCOUTQ = 0x5411          # bytes in the send queue not yet acknowledged (TIOCOUTQ)
DRAIN_POLL_MAX = 0.005     # the EOF hand-over polls the kernel at most this far apart
HOLD = 1 << 30             # SO_RCVLOWAT while a pair enters the map (the kernel caps it at tcp_rmem[2] / 2)
DRAIN_LIMIT = 30.0         # a half-close whose bytes never leave (the other side stopped reading) resets


class SpliceRefused(TcpmeshError):
    """This connection cannot be spliced (nothing was joined); it is relayed in user space instead."""


def pin_names(source_dir: Path, sockets: int) -> tuple[str, str]:
    """(maps directory, program set directory) names for this source tree and size (pure apart from reads)."""
    maps = hashlib.sha256(f"layout {LAYOUT_VERSION} abi {abi.SPLICE_ABI_VERSION} sockets {sockets}\n".encode())
    for rel in HEADERS:
        maps.update(hashlib.sha256((source_dir / rel).read_bytes()).digest())
    maps_name = f"{PIN_PREFIX}maps-v{abi.SPLICE_ABI_VERSION}-{maps.hexdigest()[:16]}"
    prog = hashlib.sha256(f"maps {maps_name}\n".encode())
    for rel in (SOURCE_NAME, *HEADERS):
        prog.update(hashlib.sha256((source_dir / rel).read_bytes()).digest())
    return maps_name, f"{PIN_PREFIX}set-v{abi.SPLICE_ABI_VERSION}-{prog.hexdigest()[:16]}"


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def _tcp_info(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN)


def bytes_received(sock: socket.socket) -> int:
    """tcpi_bytes_received: payload the socket took in (its FIN counts one, once it came)."""
    info = _tcp_info(sock)
    return int.from_bytes(info[TCPI_BYTES_RECEIVED:TCPI_BYTES_RECEIVED + 8], sys.byteorder)


def bytes_queued(sock: socket.socket) -> int:
    """Every byte ever put in the socket's send queue: acknowledged (tcpi_bytes_acked) plus still
    queued (SIOCOUTQ). Read in that order, the sum can only fall short, never run ahead."""
    info = _tcp_info(sock)
    acked = int.from_bytes(info[TCPI_BYTES_ACKED:TCPI_BYTES_ACKED + 8], sys.byteorder)
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + outq


class KernelSplice:
    def __init__(self, bpffs_dir: str | os.PathLike, state_dir: str | os.PathLike, *,
                 source_dir: str | os.PathLike | None = None, libbpf: Libbpf | None = None,
                 sockets: int = abi.SPLICE_SOCKETS, loader_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bpffs_dir = Path(bpffs_dir)
        self.state_dir = Path(state_dir)
        self.source_dir = Path(source_dir) if source_dir else sources.bpf_dir()
        self.sockets = sockets
        self.loader_timeout = loader_timeout
        self.libbpf = libbpf
        self.compiled = False
        self._set: PinnedSet | None = None
        self._peers = -1
        self._counters = -1
        self.joined = 0   # pairs joined since start (loop thread)
        self.refused = 0  # pairs the map would not take (they stayed in user space)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        pins.ensure_bpffs(str(self.bpffs_dir))
        maps_name, set_name = pin_names(self.source_dir, self.sockets)
        set_dir, maps_dir = self.bpffs_dir / set_name, self.bpffs_dir / maps_name
        flags = (f"-I{self.source_dir}", f"-DTCPMESH_SPLICE_SOCKETS={self.sockets}",
                 f'-DTCPMESH_MAPS_DIR="{maps_dir}"')
        request = LoadRequest(source=str(self.source_dir / SOURCE_NAME), cflags=flags, state_dir=str(self.state_dir),
                              programs=(Program(PROGRAM, PROG_SK_SKB),),
                              pin_to=PinTo(str(self.bpffs_dir), set_name, maps_name))
        self.compiled = adopt_or_pin(request, abi.MAPS, self.loader_timeout) is not None
        libbpf = self.libbpf = self.libbpf or Libbpf()
        self._set = PinnedSet.open(libbpf, set_dir, maps_dir, [PROGRAM], abi.MAPS)
        try:
            self._peers, self._counters = self._set.map_fd(PEERS), self._set.map_fd(COUNTERS)
            # the verdict stays attached to the pinned map; a restarted agent attaches the same program again
            libbpf.map_prog_attach(self._set.prog_fd(PROGRAM), self._peers, ATTACH_SK_SKB_STREAM_VERDICT,
                                   f"{PROGRAM} on {maps_dir / PEERS}")
        except BaseException:
            self.close()
            raise
        pins.prune(self.bpffs_dir, {set_name, maps_name}, (PIN_PREFIX,))

    def close(self) -> None:
        """Close our fds; the pins (and the verdict on the map) stay. Idempotent."""
        if self._set is not None:
            self._set.close()
        self._set, self._peers, self._counters = None, -1, -1

    @property
    def loaded(self) -> bool:
        return self._peers >= 0

    # ---- data path (loop) -----------------------------------------------------------------------------
    def join(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """Splice ``a`` and ``b``: from now on the kernel moves every byte either receives to the other.
        Returns their cookies (for ``part``). Raises AttachError (nothing left in the map) when the
        map will not take them; the caller relays in user space then."""
        assert self.libbpf is not None
        ca, cb = socket_cookie(a), socket_cookie(b)
        ka, kb = ca.to_bytes(8, sys.byteorder), cb.to_bytes(8, sys.byteorder)
        # Hold both sockets' data-ready while they enter the map one after the other: the verdict
        # runs from data-ready only when the queue reaches SO_RCVLOWAT, so nothing is judged before
        # the pair is complete (judged then, a byte would find no peer and stay behind).
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD)
        try:
            self.libbpf.map_update(self._peers, ka, b.fileno().to_bytes(4, sys.byteorder), PEERS)  # a's bytes -> b
            self.libbpf.map_update(self._peers, kb, a.fileno().to_bytes(4, sys.byteorder), PEERS)  # b's bytes -> a
        except AttachError:
            self.refused += 1
            self.part(ca, cb)
            raise
        finally:
            # Release: SO_RCVLOWAT 1 calls tcp_data_ready, which runs the verdict over what is queued
            # (what arrived before and during the join), in order (module docstring).
            for sock in (a, b):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.joined += 1
        return ca, cb

    def part(self, a_cookie: int, b_cookie: int) -> None:
        if self.libbpf is None or self._peers < 0:
            return
        for cookie in (a_cookie, b_cookie):
            try:
                self.libbpf.map_delete(self._peers, cookie.to_bytes(8, sys.byteorder), PEERS)
            except AttachError as exc:
                log.warning("kernel splice: could not delete socket %d from %s: %s", cookie, PEERS, exc)

    # ---- inspection ---------------------------------------------------------------------------------
    def entries(self) -> int:
        """Sockets in the sockhash now (two per spliced connection)."""
        assert self.libbpf is not None
        return len(self.libbpf.map_keys(self._peers, 8, PEERS))

    def counters(self) -> dict[str, int] | None:
        assert self.libbpf is not None
        return read_reason_counters(self.libbpf, self._counters, REASON_NAMES, COUNTERS)


def splice_from_config(config: Any) -> tuple[KernelSplice | None, str]:
    """The kernel splice ``proxy.same_node: splice`` asks for, loaded, and why not when it is None
    (then the same-node path relays in user space; the reason goes to the log and to doctor)."""
    if config.proxy.same_node != "splice":
        return None, ""
    splice = KernelSplice(config.capture.bpffs_dir or pins.default_bpffs_dir(config.node.name), config.state_dir)
    try:
        splice.load()
    except (TcpmeshError, OSError) as exc:
        reason = (f"the kernel cannot splice sockets here ({exc}); same-node connections are relayed in user "
                  "space instead (set proxy.same_node: local to silence this, or see `tcpmesh doctor`)")
        log.warning("proxy.same_node splice: %s", reason)
        return None, reason
    log.info("same-node connections are spliced in the kernel (bpf/splice.c, %s)",
             "compiled" if splice.compiled else "adopted the pinned program")
    return splice, ""


class SocketEnds:
    """Tells a spliced pair when one of its sockets has read its peer's FIN or met an error, without
    ever reading the socket: one epoll set (``EPOLLRDHUP``; ``EPOLLERR``/``EPOLLHUP`` come always),
    itself watched by the event loop. A spliced socket must not be read — a read races the verdict
    for the receive queue (6.x hands queued skbs to ``tcp_recvmsg`` when the psock queue is empty) —
    and its readability says nothing, so the legs stay paused and only these events are asked for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = None
        self._callbacks: dict[int, Callable[[int], None]] = {}

    def watch(self, fd: int, callback: Callable[[int], None], events: int = select.EPOLLRDHUP) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        if fd in self._callbacks:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def forget(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(events)

    def close(self) -> None:
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._epoll, self._callbacks = None, {}


class SplicedPair:
    """Two spliced legs (a = the client's, b = the workload's) and the end of their connection."""

    def __init__(self, splice: KernelSplice, ends: SocketEnds, a: Leg, b: Leg) -> None:
        self._splice = splice
        self._ends = ends
        self.a = a
        self.b = b
        self._socks = (a.socket(), b.socket())
        self._fds = tuple(s.fileno() if s is not None else -1 for s in self._socks)
        self._cookies: tuple[int, int] | None = None
        self._fin = [False, False]     # the socket read its peer's FIN
        self._passed = [False, False]  # ... and it was passed on as a shutdown of the other socket
        self._counts: tuple[int, int] | None = None  # frozen at the end
        self._syn = (0, 0)
        self._drains: set[asyncio.Task] = set()
        self.done: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        """Join the sockets in the kernel and watch their ends (then await ``done``). Raises
        SpliceRefused, AttachError or OSError (nothing joined) when this connection cannot be
        spliced; the caller relays it in user space then, from where it stands."""
        sa, sb = self._socks
        if sa is None or sb is None:
            raise AttachError("BPF_MAP_UPDATE_ELEM", PEERS, errno.EBADF)
        for leg in (self.a, self.b):
            if leg.peer_eof or leg.lost:
                raise SpliceRefused(f"the {self._name(0 if leg is self.a else 1)} connection ended before the splice")
        # uvloop keeps a leg's first read armed even when connection_made paused it (until that read
        # happened): pausing again stops it for good.
        for leg in (self.a, self.b):
            leg.resume_reading()
            leg.pause_reading()
        # what each send queue held before anything was sent: nothing but the SYN, which
        # tcpi_bytes_acked counts on a connecting socket
        self._syn = (bytes_queued(sa), bytes_queued(sb))
        # What that read took (the first bytes the peer sent) goes to the other socket first, and
        # the join waits until the kernel has all of it: nothing the kernel moves can overtake it.
        for leg, other in ((self.a, self.b), (self.b, self.a)):
            data = leg.take_pending()
            if data:
                other.write(data)
        delay = 0.0
        while self.a.write_buffer_size() or self.b.write_buffer_size():
            if self.a.lost or self.b.lost:
                raise SpliceRefused("the connection ended while the bytes read before the splice were handed over")
            await asyncio.sleep(delay)
            delay = min(DRAIN_POLL_MAX, delay * 2 or 0.0002)
        self._cookies = self._splice.join(sa, sb)
        for side in (0, 1):
            self._ends.watch(self._fds[side], lambda events, side=side: self._event(side, events))

    # ---- byte counts (the kernel's) ---------------------------------------------------------------------
    def _received(self, side: int) -> int:
        sock = self._socks[side]
        if sock is None:
            return 0
        try:
            return max(0, bytes_received(sock) - (1 if self._fin[side] else 0))  # less the FIN
        except OSError:
            return 0

    @property
    def a_to_b(self) -> int:
        return self._counts[0] if self._counts is not None else self._received(0)

    @property
    def b_to_a(self) -> int:
        return self._counts[1] if self._counts is not None else self._received(1)

    # ---- the sockets' ends ------------------------------------------------------------------------------
    def _leg(self, side: int) -> Leg:
        return self.a if side == 0 else self.b

    def _event(self, side: int, events: int) -> None:
        if self.done.done():
            return
        if events & select.EPOLLERR:
            sock = self._socks[side]
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else errno.EBADF
            self._end_lost(side, f"{self._name(side)} connection lost: "
                                 f"{OSError(code, os.strerror(code)) if code else 'closed before end of stream'}")
            return
        if events & (select.EPOLLRDHUP | select.EPOLLHUP) and not self._fin[side]:
            self._fin[side] = True
            self._ends.watch(self._fds[side], lambda ev, side=side: self._event(side, ev), 0)  # errors only now
            task = asyncio.get_running_loop().create_task(self._hand_over_eof(side))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            return
        if events & select.EPOLLHUP:  # both directions shut (and no error): nothing more to learn here
            self._ends.forget(self._fds[side])

    async def _hand_over_eof(self, side: int) -> None:
        """shutdown(SHUT_WR) on the other socket once every byte this one received is in its send queue."""
        src, dst = self._socks[side], self._socks[1 - side]
        assert src is not None and dst is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_LIMIT
        delay = 0.0
        while True:
            try:
                if bytes_queued(dst) - self._syn[1 - side] >= bytes_received(src) - 1:  # less the FIN
                    break
            except OSError as exc:
                self._end_lost(1 - side, f"{self._name(1 - side)} connection lost: {exc}")
                return
            if loop.time() >= deadline:
                self._end_lost(side, f"{self._name(1 - side)} did not take the last bytes within "
                                     f"{DRAIN_LIMIT:.0f}s of the half-close")
                return
            await asyncio.sleep(delay)
            delay = min(DRAIN_POLL_MAX, delay * 2 or 0.0002)
            if self.done.done():
                return
        self._passed[side] = True
        self._leg(1 - side).write_eof()
        if all(self._passed):
            self._finish("")

    def _end_lost(self, side: int, reason: str) -> None:
        """One connection failed: reset the other, as the relay does."""
        if self.done.done():
            return
        self._freeze()
        self._leg(1 - side).reset()
        self._leg(side).reset()
        self._finish(reason)

    @staticmethod
    def _name(side: int) -> str:
        return "client" if side == 0 else "upstream"

    def _freeze(self) -> None:
        if self._counts is None:
            self._counts = (self.a_to_b, self.b_to_a)

    def _finish(self, error: str) -> None:
        if self.done.done():
            return
        self._freeze()
        for fd in self._fds:
            self._ends.forget(fd)
        if self._cookies is not None:
            self._splice.part(*self._cookies)
        for task in list(self._drains):
            task.cancel()
        if not error:
            self.a.close()
            self.b.close()
        assert self._counts is not None
        self.done.set_result(RelayResult(self._counts[0], self._counts[1], error))

    def abort(self, reason: str) -> None:
        """Stop now (agent shutdown past its drain time, a workload removed): reset both legs."""
        if self.done.done():
            return
        self._freeze()
        self.a.reset()
        self.b.reset()
        self._finish(reason)
