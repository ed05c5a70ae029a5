"""The issuer's TLS listener: lines in, ``IssuerService.handle_line`` answers out. Owns sockets and their limits.

TLS 1.3 with P-256 key exchange (``identity.tls.issuer_context``), ALPN ``tcpmesh-issuer/1``, the
client certificate optional but verified when sent. The server certificate
(``spiffe://<td>/tcpmesh/issuer``, minted from the issuing CA) is renewed at half its lifetime by
building a new context: new handshakes get it, open connections keep theirs.

**Trust reloads** (``trustroots``): a context is built from the bundle loaded now plus the roots removed
from it (while this replica ran, or before: ``removed-roots.pem``). A client whose verified chain ends at a removed root is refused right
after the handshake, by name (``removed_root``: which root, the fix), before anything it sends is read.
A reload that removes a root closes every open connection whose chain ends at it
(``closed_by_trust_reload``, one warning line per reload): a connection keeps the context it was
accepted with, and an SSLContext cannot forget a root, so this is where the removal takes effect for
them. Connections without a client certificate, or under a root still trusted, are not touched.

Hostile or slow clients (``limits``: ``config.LimitsConfig``; docs/identity.md "Limits of one
replica") hold bounded resources for a bounded time, and nodes are still served meanwhile:

- **Before the handshake** (anyone can open a TCP connection): at most ``max_handshakes_per_address``
  handshakes in progress per source address — the next is reset at once (``address_limit``) — and
  ``max_handshakes`` in all; when that table is full the *oldest* handshake is cut (``busy``): a real
  client's handshake takes milliseconds, a stalled one holds its place until it is the oldest, so
  an attacker must keep replacing the whole table faster than one handshake to shut a node out. A
  handshake gets ``handshake_timeout_seconds`` (``handshake_timeout``); a failed one is counted
  (``handshake_failed``). At start the soft open-file limit is raised to what the limits can hold
  (``descriptors_needed``), so they are reached before EMFILE is (asyncio pauses accepting on it).
- **After it**: ``max_connections`` in all, at most half of them without a node credential (joins
  and attestations: anyone may try those), ``max_connections_per_peer`` per node credential (or,
  without one, per source address); the rest are answered a refusal (``busy`` / ``rate_limited``)
  and closed. The first request must be complete within ``request_timeout_seconds`` of the
  handshake (``request_timeout``: a slowloris is cut), later ones within ``idle_seconds``.
- **Requests** run on ``workers`` threads, off the event loop; the Kubernetes attestor bounds its
  own waits (``limits.attestations`` < ``workers`` at once, each within its deadline), so a slow API
  server delays only the requests that need it.

Every refusal is counted in ``tcpmesh_issuer_refusals_total{reason}``; the connection-level ones
(no request, so no per-request log line) are logged as one summary line per ``LOG_EVERY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import resource
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from agent.errors import TcpmeshError
from agent.identity.tls import issuer_context, peer_uri, require_verified_chain
from agent.issuer import protocol
from agent.issuer.config import LimitsConfig
from agent.issuer.service import IssuerService, Peer
from agent.issuer.trustroots import ChainRoot, TrustRoots, chain_root, removed_root_message

log = logging.getLogger("tcpmesh.issuer")

ALPN = "tcpmesh-issuer/1"
SERVER_CERT_TTL_SECONDS = 24 * 3600
LOG_EVERY_SECONDS = 10.0
SPARE_DESCRIPTORS = 64   # registry, CA files, metrics scrapes, the API server, logs
WORKER_JOIN_SECONDS = 5.0   # at stop, after the attestor's threads ended: what a request's CPU work may still take


def descriptors_needed(limits: LimitsConfig) -> int:
    """Open files the limits can hold at once: every connection, every handshake, and some to spare. Pure."""
    return limits.max_connections + limits.max_handshakes + SPARE_DESCRIPTORS


def open_file_soft_limit(soft: int, hard: int, need: int) -> int:
    """The soft RLIMIT_NOFILE to run with: ``soft`` if it is enough, else raised up to ``hard``; a hard limit
    below ``need`` is an error naming the fix (the limits would otherwise end in EMFILE under load). Pure."""
    if soft >= need:
        return soft
    if hard != -1 and hard < need:   # -1: RLIM_INFINITY
        raise TcpmeshError(f"the issuer's limits need {need} open files (limits.max_connections + "
                           f"limits.max_handshakes + {SPARE_DESCRIPTORS}) but the process may open at most {hard}: "
                           "raise LimitNOFILE (systemd) / the container's nofile ulimit, or lower "
                           "limits.max_connections and limits.max_handshakes")
    return need


def _abort(writer: asyncio.StreamWriter) -> None:
    if writer.transport is not None:
        writer.transport.abort()


class _UnreadUntilTls(asyncio.StreamReaderProtocol):
    """A stream protocol that reads nothing until ``start_tls``: the ClientHello must reach the TLS layer,
    not the plain stream's buffer (where it would be lost if it arrived before the handshake starts)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()   # type: ignore[attr-defined]
        super().connection_made(transport)


class IssuerServer:
    def __init__(self, service: IssuerService, address: str, port: int, *, limits: LimitsConfig = LimitsConfig(),
                 metrics: Any = None) -> None:
        require_verified_chain()   # every handshake's chain root is read (removed roots): fail closed at start
        self.service = service
        self.address, self.port = address, port
        self.limits = limits
        # read per connection, so a test may shrink them on a running server
        self.max_connections, self.idle_seconds = limits.max_connections, limits.idle_seconds
        self.request_timeout = limits.request_timeout_seconds
        self._metrics = metrics
        self._open = 0
        self._anonymous = 0                    # open connections without a node credential
        self._per_peer: dict[str, int] = {}   # node name (verified credential) or source address -> open connections
        self._handshakes: dict[asyncio.StreamWriter, str] = {}   # in progress, oldest first -> source address
        self._handshakes_per_address: dict[str, int] = {}
        self._cut: set[asyncio.StreamWriter] = set()             # handshakes cut to make room (counted already)
        self._refused: collections.Counter[str] = collections.Counter()   # since the last summary line
        self._logged_at = time.monotonic()
        self._in_flight = 0
        self._server: asyncio.AbstractServer | None = None
        self._worker = ThreadPoolExecutor(limits.workers, thread_name_prefix="issuer-requests")
        self._worker_threads: set[threading.Thread] = set()
        self._tasks: set[asyncio.Task[Any]] = set()   # one per accepted connection, until it ends
        self._connections: dict[asyncio.StreamWriter, ChainRoot | None] = {}   # served now -> its chain's root
        self._closed_by_reload: set[asyncio.StreamWriter] = set()
        self.roots = TrustRoots(service.ca.roots, service.ca.removed_roots)
        self.context = self._make_context()

    def _make_context(self) -> ssl.SSLContext:
        credential = self.service.ca.server_credential(SERVER_CERT_TTL_SECONDS, datetime.now(timezone.utc))
        self.server_not_after = credential.not_after
        return issuer_context(True, self.roots.tls_pem(), credential.chain_pem, credential.key_pem, alpn=ALPN)

    def refresh_server_certificate(self) -> None:
        """A new TLS context for new handshakes — a fresh server certificate from the CA loaded now and the roots
        of the bundle loaded now: a root added (``ca rotate add-root``) is trusted for client certificates from
        here on; a removed one (``remove-old``) is refused by name after the handshake, and every open connection
        under it is closed now (an SSLContext cannot forget a root, so it is rebuilt, not amended). On the event
        loop: a handshake starting after it uses the new context."""
        removed = self.roots.update(self.service.ca.roots, self.service.ca.removed_roots)
        self.context = self._make_context()
        if removed:
            self._close_connections_under_removed_roots()

    def _close_connections_under_removed_roots(self) -> None:
        closed: collections.Counter[str] = collections.Counter()
        for writer, root in list(self._connections.items()):
            if root is None or not self.roots.is_removed(root):
                continue
            self._closed_by_reload.add(writer)
            closed[f"{root.subject} ({root.fingerprint[:19]}…)"] += 1
            self._count("closed_by_trust_reload")
            _abort(writer)
        if closed:
            log.warning("issuer: closed %d open connection(s) whose client certificate chains to a root removed from "
                        "the trust bundle: %s; those nodes must join again (`tcpmesh issuer token <node>` or a node "
                        "credential from the current root)", sum(closed.values()),
                        ", ".join(f"{n} under {r}" for r, n in closed.items()))

    async def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = open_file_soft_limit(soft, hard, descriptors_needed(self.limits))
        if wanted != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("issuer: open-file limit raised from %d to %d for its limits", soft, wanted)
        # plain TCP here: the handshake is started per connection, after the handshake limits are checked
        loop = asyncio.get_running_loop()

        def unread() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=protocol.MAX_LINE_BYTES + 1, loop=loop)
            return _UnreadUntilTls(reader, self._accept, loop=loop)

        self._server = await loop.create_server(unread, self.address, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("issuer %s listening on %s:%d (TLS 1.3, ALPN %s) for trust domain %s; limits: %s", self.service.name,
                 self.address, self.port, ALPN, self.service.ca.trust_domain, self.limits)

    async def close(self) -> None:
        """Stop listening, abort the handshakes and connections in progress (their tasks end here, rather than
        being destroyed pending with the loop), end the attestor's threads (it cuts its API calls), then join
        the request workers
        (what they still run is bounded: an attestation is cut now, the rest is CPU), within
        ``WORKER_JOIN_SECONDS``. No thread of the issuer's outlives this (a leftover one is logged as an error)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in (*self._handshakes, *self._connections):   # their tasks end, not destroyed pending
            _abort(writer)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WORKER_JOIN_SECONDS)
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.service.close()
        deadline = time.monotonic() + WORKER_JOIN_SECONDS
        for thread in list(self._worker_threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._worker_threads if t.is_alive()]
        if alive:
            log.error("issuer: request worker(s) still running at stop: %s", ", ".join(alive))

    def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """One request on a worker thread (the thread is remembered: ``close`` joins it)."""
        self._worker_threads.add(threading.current_thread())
        return self.service.handle_line(line, peer)

    # -- before the handshake --------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:   # close() waits for it
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        address = str((writer.get_extra_info("peername") or ("?",))[0])
        if self._handshakes_per_address.get(address, 0) >= self.limits.max_handshakes_per_address:
            self._reset(writer, "address_limit")
            return
        if len(self._handshakes) >= self.limits.max_handshakes:
            oldest = next(iter(self._handshakes))
            self._cut.add(oldest)
            self._count("busy")
            _abort(oldest)
        self._handshakes[writer] = address
        self._handshakes_per_address[address] = self._handshakes_per_address.get(address, 0) + 1
        self._gauge("handshakes", len(self._handshakes))
        try:
            await self._start_tls(writer)
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                raise ssl.SSLError("the client did not ask for ALPN " + ALPN)
        except asyncio.TimeoutError:
            self._reset(writer, "handshake_timeout")
            return
        except (ssl.SSLError, OSError, EOFError) as exc:
            log.debug("issuer: TLS handshake from %s failed: %s", address, exc)
            if writer not in self._cut:
                self._count("handshake_failed")
            _abort(writer)
            return
        finally:
            self._cut.discard(writer)
            del self._handshakes[writer]
            if self._handshakes_per_address[address] <= 1:
                del self._handshakes_per_address[address]
            else:
                self._handshakes_per_address[address] -= 1
            self._gauge("handshakes", len(self._handshakes))
        await self._serve(reader, writer, address, ssl_object, chain_root(ssl_object))

    async def _refuse_connection(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        """Answer ``answer`` (a refusal) without reading a request, then close."""
        writer.write(protocol.encode(answer))
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), self.request_timeout)
        _abort(writer)

    async def _start_tls(self, writer: asyncio.StreamWriter) -> None:
        """The server handshake on ``writer``, within ``handshake_timeout_seconds``. A connection lost or cut
        (``busy``) during it raises ConnectionResetError and leaves ``writer`` on its closed plain transport:
        CPython 3.11's ``loop.start_tls`` then returns no transport, ``StreamWriter.start_tls`` fails on that with
        AttributeError and keeps ``None``, on which the writer's ``__del__`` raises again when collected."""
        plain = writer.transport
        try:
            await asyncio.wait_for(writer.start_tls(self.context, ssl_handshake_timeout=
                                                    self.limits.handshake_timeout_seconds + 1),
                                   self.limits.handshake_timeout_seconds)
        except AttributeError:
            if writer.transport is not None:
                raise
        if writer.transport is None:
            writer._transport = plain   # type: ignore[attr-defined]  # closed already: __del__ then does nothing
            raise ConnectionResetError("the connection was lost or cut during the TLS handshake")

    def _reset(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Close with a reset, not a FIN: nothing was answered; the client tries its next issuer address."""
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        _abort(writer)
        self._count(reason)

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.refusals.labels(reason=reason).inc()
        self._refused[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            log.warning("issuer: refused or cut %d connections in the last %.0f s before any request: %s "
                        "(limits: %s)", sum(self._refused.values()), now - self._logged_at,
                        ", ".join(f"{r} {n}" for r, n in self._refused.most_common()), self.limits)
            self._refused.clear()
            self._logged_at = now

    def _gauge(self, name: str, value: int) -> None:
        if self._metrics is not None:
            getattr(self._metrics, name).set(value)

    # -- after it ---------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str,
                     ssl_object: Any, root: ChainRoot | None) -> None:
        peer = Peer(address, peer_uri(ssl_object), ssl_object.getpeercert(True))
        if root is not None and self.roots.is_removed(root):   # the context holds it only to refuse it by name
            why = removed_root_message(root, self.service.node_of(peer))
            await self._refuse_connection(writer, self.service.refuse_removed_root(peer, why))
            return
        key = self.service.connection_key(peer)
        anonymous = not key.startswith("node ")
        per_peer = min(self.limits.max_connections_per_peer, max(1, self.max_connections // 4))
        refusal = None
        if self._open >= self.max_connections:
            refusal = ("busy", f"the issuer holds its limit of {self.max_connections} connections")
        elif anonymous and self._anonymous >= max(1, self.max_connections // 2):
            refusal = ("busy", f"the issuer holds its limit of {max(1, self.max_connections // 2)} connections "
                               "without a node credential")
        elif self._per_peer.get(key, 0) >= per_peer:
            refusal = ("rate_limited", f"{key} holds {per_peer} connections already")
        if refusal is not None:
            await self._refuse_connection(writer, self.service.refuse_connection(peer, refusal[1], refusal[0]))
            return
        self._connections[writer] = root
        self._per_peer[key] = self._per_peer.get(key, 0) + 1
        self._open += 1
        self._anonymous += anonymous
        self._gauge("connections", self._open)
        try:
            first = True
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(),
                                                  self.request_timeout if first else self.idle_seconds)
                except (asyncio.LimitOverrunError, ValueError):   # longer than MAX_LINE_BYTES: refuse, loudly
                    writer.write(protocol.encode(self.service.refuse_oversized(peer)))
                    await writer.drain()
                    break
                except asyncio.TimeoutError:
                    if first:
                        self._count("request_timeout")
                    break
                except (ConnectionError, ssl.SSLError):
                    break
                if not line or writer in self._closed_by_reload:
                    break
                first = False
                self._in_flight += 1
                self._gauge("requests_in_flight", self._in_flight)
                try:
                    answer = await asyncio.get_running_loop().run_in_executor(self._worker, self._answer, line, peer)
                finally:
                    self._in_flight -= 1
                    self._gauge("requests_in_flight", self._in_flight)
                if writer in self._closed_by_reload:   # its root left the bundle while the request was answered
                    break
                writer.write(protocol.encode(answer))
                await asyncio.wait_for(writer.drain(), self.idle_seconds)
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            pass
        finally:
            del self._connections[writer]
            self._closed_by_reload.discard(writer)
            self._open -= 1
            self._anonymous -= anonymous
            if self._per_peer[key] <= 1:
                del self._per_peer[key]
            else:
                self._per_peer[key] -= 1
            self._gauge("connections", self._open)
            writer.close()
