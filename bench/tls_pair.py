"""An established TLS 1.3 tunnel with no sockets: two real ``TlsLeg``s handshaken over in-memory transports.

Harness for per-message measurements (bench/hop_steps.py) and the tests that drive the tunnel's legs
directly (tests/unit/test_endpoints_tls_buffer.py, tests/integration/test_mux_session.py):
``tls_contexts(workdir)`` makes a throwaway self-signed P-256 certificate with ``openssl`` and the
server/client context pair (the client checks the server's certificate against it); ``MemoryTransport``
keeps what a leg writes until ``take()``; ``connected_pair(contexts)`` handshakes a client and a server
leg over two of them; ``use_hotpath(name)`` runs a block on the pure-Python or the compiled data path.

It lives in bench/, not in agent/: the wheel ships only ``agent*``, and a throwaway certificate or a
fake transport must never be reachable from the agent. Imports agent.proxy only; never tests/.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from pathlib import Path
from typing import Iterator

from agent.proxy import hotpath
from agent.proxy import mux as M
from agent.proxy.endpoints import TlsLeg

HANDSHAKE_TIMEOUT = 5.0


def tls_contexts(workdir: Path, common_name: str = "tcpmesh-pair") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS 1.3 contexts over a new self-signed certificate written to ``workdir``."""
    key, cert = workdir / "k.pem", workdir / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-subj", f"/CN={common_name}", "-days", "1"],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False   # the certificate names no host; it is still verified against itself
    client.load_verify_locations(cert)
    return server, client


class MemoryTransport:
    """An asyncio transport that keeps what is written (``take()`` returns and clears it)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closing = self.aborted = False

    def get_extra_info(self, name, default=None):
        return default

    def write(self, data) -> None:
        self.sent.append(bytes(data))

    def take(self) -> bytes:
        out, self.sent = b"".join(self.sent), []
        return out

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def connected_pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> tuple[TlsLeg, MemoryTransport, TlsLeg]:
    """(client leg, the client's transport, server leg), handshake done; the server's transport is ``server.transport``."""
    server_ctx, client_ctx = contexts
    client, server = TlsLeg(client_ctx, server_side=False), TlsLeg(server_ctx, server_side=True)
    ct, st = MemoryTransport(), MemoryTransport()
    server.connection_made(st)
    client.connection_made(ct)
    for _ in range(10):
        if client.handshake_done.done() and server.handshake_done.done() and not ct.sent and not st.sent:
            break
        if ct.sent:
            server.data_received(ct.take())
        if st.sent:
            client.data_received(st.take())
    await asyncio.wait_for(asyncio.gather(client.handshake_done, server.handshake_done), HANDSHAKE_TIMEOUT)
    return client, ct, server


@contextlib.contextmanager
def use_hotpath(name: str) -> Iterator[None]:
    """Run the block on data path ``name`` ("python" or "compiled"; the latter must be built: check
    ``"compiled" in agent.proxy.mux.DECODERS`` first)."""
    if name not in M.DECODERS:
        raise ValueError(f"data path {name!r} is not available ({hotpath.describe()}); known: {sorted(M.DECODERS)}")
    saved = hotpath.compiled, M.FrameDecoder
    hotpath.compiled = hotpath.built if name == "compiled" else None
    M.FrameDecoder = M.DECODERS[name]
    try:
        yield
    finally:
        hotpath.compiled, M.FrameDecoder = saved
