"""The issuer protocol's client: one request → one answer over TLS, trying each issuer address in turn.

Stdlib only (socket, ssl, json): the agent uses it and must not import cryptography. Blocking; the
agent calls it from its identity worker thread. The issuer must present a certificate that verifies
against the trust bundle and names ``spiffe://<td>/tcpmesh/issuer`` — a node or workload certificate
of the same trust domain is refused, so a compromised node cannot pose as the issuer. The client
certificate is the node credential (none for a token join).

``abort`` (the agent's stop, from another thread) ends the call in flight at once — its socket is shut down, so
a slow or stalled issuer cannot hold the stop for the call's timeout — and every later call fails at once.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from agent.errors import TcpmeshError
from agent.identity.spiffe import issuer_id_uri
from agent.identity.tls import describe_tls_error, issuer_context, peer_uri
from agent.issuer import protocol

ALPN = "tcpmesh-issuer/1"   # the server's (agent.issuer.server.ALPN); repeated so this module needs no asyncio
DEFAULT_TIMEOUT_SECONDS = 10.0


class IssuerUnavailable(TcpmeshError):
    """No issuer address answered (each address's failure is in the message)."""


@dataclass(frozen=True)
class Credential:
    chain_pem: str
    key_pem: str


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


class IssuerClient:
    def __init__(self, addresses: Sequence[str], bundle_pem: str, trust_domain: str, *,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.addresses = [parse_address(a) for a in addresses]
        self.bundle_pem = bundle_pem
        self.expected = issuer_id_uri(trust_domain)
        self.timeout = timeout
        self._next = 0
        self.last_address: str | None = None
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None   # the call in flight's, for abort
        self._aborted = False

    def abort(self) -> None:
        """End the call in flight now (its socket shut down) and refuse every later one (thread-safe)."""
        with self._lock:
            self._aborted = True
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def call(self, request: dict[str, Any], credential: Credential | None) -> dict[str, Any]:
        """The issuer's answer (``ok`` true, or a refusal); ``IssuerUnavailable`` if no address answered."""
        ctx = issuer_context(False, self.bundle_pem, credential.chain_pem if credential else None,
                             credential.key_pem if credential else None, alpn=ALPN)
        problems = []
        count = len(self.addresses)
        for i in range(count):
            if self._aborted:
                raise IssuerUnavailable("not asking the issuer: this agent is stopping")
            host, port = self.addresses[(self._next + i) % count]
            try:
                answer = self._one(ctx, host, port, request)
            except ssl.SSLError as exc:   # in words: which side refused which certificate (alerts included)
                problems.append(f"{host}:{port}: {exc} — {describe_tls_error(exc)}")
                continue
            except (OSError, ValueError) as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            self._next = (self._next + i) % count  # stay with the one that answered
            self.last_address = f"{host}:{port}"
            return answer
        self._next = (self._next + 1) % count
        raise IssuerUnavailable("no issuer answered: " + "; ".join(problems))

    def _one(self, ctx: ssl.SSLContext, host: str, port: int, request: dict[str, Any]) -> dict[str, Any]:
        with socket.create_connection((host, port), timeout=self.timeout) as raw:
            with ctx.wrap_socket(raw, do_handshake_on_connect=False) as tls:   # takes raw's descriptor over
                with self._lock:
                    if self._aborted:
                        raise OSError("this agent is stopping")
                    self._socket = tls
                try:
                    tls.do_handshake()
                    if tls.selected_alpn_protocol() != ALPN:
                        raise ValueError(f"the server did not speak {ALPN} (is this the issuer's port?)")
                    uri = peer_uri(tls)
                    if uri != self.expected:
                        raise ValueError(f"the server presented {uri!r}, not the issuer {self.expected}")
                    tls.sendall(protocol.encode(request))
                    line = tls.makefile("rb").readline(protocol.MAX_LINE_BYTES * 8)
                finally:
                    with self._lock:
                        self._socket = None
        answer = json.loads(line) if line else None
        if not isinstance(answer, dict) or "ok" not in answer:
            raise ValueError("the issuer closed the connection without an answer")
        return answer


def wait_until_root(addresses: Sequence[str], bundle_pem: str, trust_domain: str, root_fingerprint: str,
                    timeout: float, *, interval: float = 0.25) -> list[str]:
    """Ask each issuer address ``hello`` until its issuing intermediate chains to ``root_fingerprint``
    (``tcpmesh ca rotate reissue --wait-issuer``); one line per address, or ``TcpmeshError`` after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    lines = []
    for address in addresses:
        client = IssuerClient([address], bundle_pem, trust_domain, timeout=5)
        while True:
            try:
                seen = (client.call({"v": protocol.VERSION, "op": protocol.OP_HELLO}, None).get("ca") or {}) \
                    .get("root_fingerprint")
            except IssuerUnavailable as exc:
                seen = f"no answer ({exc})"
            if seen == root_fingerprint:
                lines.append(f"issuer {address} signs under the new root")
                break
            if time.monotonic() >= deadline:
                raise TcpmeshError(f"the issuer at {address} does not sign under the new root after {timeout:.0f}s "
                                   f"(it reports {seen}); has it reloaded its directory? Check its log before going on")
            time.sleep(interval)
    return lines
