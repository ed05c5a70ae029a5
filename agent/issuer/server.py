"""The issuer's TLS listener: lines in, ``IssuerService.handle_line`` answers out. Owns sockets only.

TLS 1.3 with P-256 key exchange (``identity.tls.issuer_context``), ALPN ``tcpmesh-issuer/1``, the
client certificate optional but verified when sent. At most ``max_connections`` at once, and per node
credential (or, without one, per source address) ``MAX_CONNECTIONS_PER_PEER`` (at most a quarter of the
total), so one node cannot lock the others out; the rest get a ``rate_limited`` refusal and are
closed. 10 s for a handshake, ``idle_seconds`` between requests. The server certificate
(``spiffe://<td>/tcpmesh/issuer``, minted from the issuing CA) is renewed at half its lifetime by
loading a new chain into the same context: new handshakes get it, open connections keep theirs.
Requests are answered one at a time on one worker thread, off the event loop: a Kubernetes
attestation waits for the API server (bounded by its timeout) without stalling handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from agent.identity.tls import issuer_context, load_credential, peer_uri
from agent.issuer import protocol
from agent.issuer.service import IssuerService, Peer

log = logging.getLogger("tcpmesh.issuer")

ALPN = "tcpmesh-issuer/1"
HANDSHAKE_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS_PER_PEER = 16   # an agent uses one connection per call; a node cannot hold the others' share
SERVER_CERT_TTL_SECONDS = 24 * 3600


class IssuerServer:
    def __init__(self, service: IssuerService, address: str, port: int, *, max_connections: int = 1024,
                 idle_seconds: float = 60.0, metrics: Any = None) -> None:
        self.service = service
        self.address, self.port = address, port
        self.max_connections, self.idle_seconds = max_connections, idle_seconds
        self._metrics = metrics
        self._open = 0
        self._per_peer: dict[str, int] = {}   # node name (verified credential) or source address -> open connections
        self._server: asyncio.AbstractServer | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="issuer-requests")  # one at a time, as before
        self.context = self._make_context()

    def _make_context(self) -> ssl.SSLContext:
        credential = self.service.ca.server_credential(SERVER_CERT_TTL_SECONDS, datetime.now(timezone.utc))
        self.server_not_after = credential.not_after
        return issuer_context(True, self.service.ca.bundle_pem, credential.chain_pem, credential.key_pem, alpn=ALPN)

    def refresh_server_certificate(self) -> None:
        """A new server certificate for new handshakes; open connections keep theirs. Roots added to the bundle
        (``ca rotate add-root``) are trusted for client certificates from now on; a removed root stays trusted
        by this context until the replica restarts (an SSLContext cannot forget a root)."""
        credential = self.service.ca.server_credential(SERVER_CERT_TTL_SECONDS, datetime.now(timezone.utc))
        self.context.load_verify_locations(cadata=self.service.ca.bundle_pem)
        load_credential(self.context, credential.chain_pem, credential.key_pem)
        self.server_not_after = credential.not_after

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.address, self.port, ssl=self.context,
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS,
                                                  limit=protocol.MAX_LINE_BYTES + 1)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("issuer %s listening on %s:%d (TLS 1.3, ALPN %s) for trust domain %s", self.service.name,
                 self.address, self.port, ALPN, self.service.ca.trust_domain)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            writer.close()
            return
        peer = Peer(str(peername[0]), peer_uri(ssl_object), ssl_object.getpeercert(True))
        key = self.service.connection_key(peer)
        per_peer = min(MAX_CONNECTIONS_PER_PEER, max(1, self.max_connections // 4))
        if self._open >= self.max_connections or self._per_peer.get(key, 0) >= per_peer:
            limit = (f"{key} holds {per_peer} connections already" if self._open < self.max_connections
                     else f"the issuer holds its limit of {self.max_connections} connections")
            writer.write(protocol.encode(self.service.refuse_connection(peer, limit)))
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()
            writer.close()
            return
        self._per_peer[key] = self._per_peer.get(key, 0) + 1
        self._open += 1
        if self._metrics is not None:
            self._metrics.connections.set(self._open)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_seconds)
                except (asyncio.LimitOverrunError, ValueError):   # longer than MAX_LINE_BYTES: refuse, loudly
                    writer.write(protocol.encode(self.service.refuse_oversized(peer)))
                    await writer.drain()
                    break
                except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    break
                if not line:
                    break
                answer = await asyncio.get_running_loop().run_in_executor(self._worker, self.service.handle_line,
                                                                          line, peer)
                writer.write(protocol.encode(answer))
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self._open -= 1
            if self._per_peer[key] <= 1:
                del self._per_peer[key]
            else:
                self._per_peer[key] -= 1
            if self._metrics is not None:
                self._metrics.connections.set(self._open)
            writer.close()
