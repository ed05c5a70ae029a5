"""Kernel TLS for the tunnels (``proxy.kernel_tls``): the agent's switch, its key log and the kernel's socket options.

A tunnel handshakes in user space as always (agent.proxy.endpoints.TlsLeg over memory BIOs); with kernel TLS in
use, its leg is a ``kernel_leg.SwitchingTlsLeg`` that reads the handshake record by record and, the moment the
handshake completes, hands both directions to the kernel (``install``: TCP_ULP "tls", TLS_TX, TLS_RX with record
sequence 0) and becomes a ``kernel_leg.KernelTlsLeg`` that moves plaintext frames. Each end decides alone: a
kernel end and a user-space end interoperate (the records on the wire are the same).

The traffic secrets come from OpenSSL's key log: every TLS context the tunnels use gets
``keylog_filename`` = ``/proc/self/fd/N`` of an anonymous memory file (``KeyLog``; memfd_create, never a file on
disk). Python's ssl appends one line per secret and flushes; the switch reads what is new, keeps only the
first application traffic secrets (agent.proxy.tls_records.parse_keylog), matches them to its connection by the
ClientHello random (which the leg takes from the bytes it writes or reads itself), and truncates the file. A
keylog callback in C (SSL_CTX_set_keylog_callback through the compiled module) was the alternative: it needs
CPython's private SSLContext layout and a link against libssl; the memory file needs neither, and costs nothing
when kernel TLS is off (no context gets a key log then). Secrets are never logged.

The agent's kernel TLS state (``KernelTls``: setting, in use or not and why, tunnels by implementation) and the
legs are in agent.proxy.kernel_leg, which builds on this module.

Imports agent.proxy.tls_records only.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import weakref

from agent.proxy import tls_records as R

log = logging.getLogger("tcpmesh.kernel_tls")

SOL_TLS = 282
TCP_ULP = 31
TLS_TX, TLS_RX = 1, 2
TLS_SET_RECORD_TYPE = 1
CONTENT_ALERT = 21
CLOSE_NOTIFY = b"\x01\x00"  # alert level warning, description close_notify
SETTINGS = ("auto", "on", "off")
KEPT_RANDOMS = 1024  # secrets kept for connections that have not claimed them yet (oldest dropped)
KEPT_TAKEN = 16  # secrets kept after a switch took them, for the other end of an in-process connection
FIX = ("`modprobe tls` (Debian: the tls module of linux-image), a kernel built with CONFIG_TLS, or set "
       "proxy.kernel_tls to auto (user-space TLS where the kernel cannot) or off")


class KernelTlsError(ConnectionError):
    """A tunnel could not be handed to the kernel; it is closed (never continued in plaintext)."""


class KeyLog:
    """OpenSSL's key log in an anonymous memory file, read back per connection by ClientHello random."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("tcpmesh-tls-keylog", os.MFD_CLOEXEC)
        self.path = f"/proc/self/fd/{self._fd}"
        self._adopted: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._secrets: dict[bytes, dict[str, bytes]] = {}
        self._recent: dict[bytes, dict[str, bytes]] = {}  # taken lately: the other end may be in this process too
        self._lock = threading.Lock()  # adopt runs on the identity store's worker threads too

    def adopt(self, context: ssl.SSLContext) -> None:
        """Make ``context`` log its connections' secrets here (once per context; any thread)."""
        with self._lock:
            if self._fd >= 0 and context not in self._adopted:
                context.keylog_filename = self.path
                self._adopted.add(context)

    def release(self) -> None:
        """No context logs here any more, and what was logged is gone (kernel TLS given up: auto's fallback)."""
        with self._lock:
            for context in list(self._adopted):
                context.keylog_filename = None
            self._adopted = weakref.WeakSet()
            self._secrets.clear()
            self._recent.clear()
            if self._fd >= 0:
                os.ftruncate(self._fd, 0)

    def take(self, random: bytes) -> dict[str, bytes]:
        """The secrets logged for the connection whose ClientHello random is ``random``. Both ends of a connection
        may be in this process (the probe, ``proxy.same_node: tunnel``) and log the same secrets under the same
        random, one end before the other has finished: what one end took stays a short while for the other."""
        self._read()
        found = {**self._recent.get(random, {}), **self._secrets.pop(random, {})}
        if len(found) == len(R.KEYLOG_LABELS):
            self._recent[random] = found
            while len(self._recent) > KEPT_TAKEN:
                self._recent.pop(next(iter(self._recent)))
        return found

    def forget(self, random: bytes | None) -> None:
        """A handshake failed: drop what it logged (and truncate the file, so failed handshakes never pile up)."""
        self._read()
        if random is not None:
            self._secrets.pop(random, None)

    def _read(self) -> None:
        if self._fd < 0:
            return
        size = os.fstat(self._fd).st_size
        if not size:
            return
        text = os.pread(self._fd, size, 0)
        # Python's ssl writes a whole line and flushes inside one call on the thread that runs the handshake,
        # and every tunnel handshake runs on the data path's loop thread: nothing is written between these two
        cut = text.rfind(b"\n") + 1
        os.ftruncate(self._fd, 0)
        for random, found in R.parse_keylog(text[:cut].decode("ascii", "replace")).items():
            self._secrets.setdefault(random, {}).update(found)
        while len(self._secrets) > KEPT_RANDOMS:  # handshakes that failed after their secrets: the oldest go
            self._secrets.pop(next(iter(self._secrets)))

    def close(self) -> None:
        self.release()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def keys_for(keylog: KeyLog, random: bytes | None, ssl_object: ssl.SSLObject, server_side: bool) -> tuple[bytes, bytes]:
    """(TX, RX) crypto_info for the connection: its suite, its secrets from the key log, sequence 0."""
    if ssl_object.version() != "TLSv1.3":
        raise KernelTlsError(f"kernel TLS takes TLS 1.3 only; the tunnel negotiated {ssl_object.version()}")
    if random is None:
        raise KernelTlsError("the ClientHello random was not seen: the connection's secrets cannot be matched")
    chosen = R.suite(ssl_object.cipher()[0])  # type: ignore[index]
    secrets = keylog.take(random)
    if set(secrets) != set(R.KEYLOG_LABELS):
        raise KernelTlsError(f"the key log holds no traffic secrets for this connection (found "
                             f"{', '.join(sorted(secrets)) or 'none'}); is keylog_filename set on its context?")
    mine, theirs = (R.KEYLOG_SERVER, R.KEYLOG_CLIENT) if server_side else (R.KEYLOG_CLIENT, R.KEYLOG_SERVER)
    return (R.crypto_info(chosen, *R.traffic_keys(secrets[mine], chosen)),
            R.crypto_info(chosen, *R.traffic_keys(secrets[theirs], chosen)))


def _socket_of(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)  # detached again by the caller: the transport owns the descriptor


def install(fd: int, tx: bytes, rx: bytes) -> None:
    """TCP_ULP "tls", then TLS_TX and TLS_RX on the socket ``fd``; OSError names the step that failed."""
    sock = _socket_of(fd)
    try:
        for step, level, option, value in (("TCP_ULP \"tls\"", socket.IPPROTO_TCP, TCP_ULP, b"tls"),
                                           ("TLS_TX", SOL_TLS, TLS_TX, tx), ("TLS_RX", SOL_TLS, TLS_RX, rx)):
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:
                raise OSError(exc.errno, f"setsockopt({step}): {exc.strerror}") from None
    finally:
        sock.detach()


def send_close_notify(fd: int) -> None:
    """close_notify as a TLS alert record (sendmsg with a TLS_SET_RECORD_TYPE control message)."""
    sock = _socket_of(fd)
    try:
        sock.sendmsg([CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([CONTENT_ALERT]))], socket.MSG_DONTWAIT)
    finally:
        sock.detach()


def ended_by_peer(exc: BaseException | None) -> bool:
    """A kernel TLS receive error that means the peer sent a non-data record (close_notify, an alert, a
    KeyUpdate): the tunnel ends, as at a close_notify in user space."""
    return isinstance(exc, OSError) and exc.errno == errno.EIO
