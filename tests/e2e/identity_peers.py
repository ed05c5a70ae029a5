"""Helpers the identity e2e tests run inside lab namespaces (``python tests/e2e/identity_peers.py ...``).

    stream --connect IP:PORT         an application connection that streams random chunks to an echo
                                     server and checks the echo, until its stdin closes; then
                                     half-closes, drains, prints one JSON line (sent, received, sha256s, error)
    rogue-server --bind IP:PORT --cert CHAIN --key KEY
                                     a TLS 1.3 server that speaks the tunnel's ALPN and presents the
                                     given certificate (an impostor in place of a node's inbound proxy)
    rogue-client --connect IP:PORT --cert CHAIN --key KEY --sni NAME
                                     a TLS 1.3 client presenting the given certificate to an inbound proxy;
                                     prints one JSON line with the handshake's outcome

Plain Python and the ssl module only: they play peers, not tcpmesh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time

CHUNK = 32 * 1024


def stream(address: str, interval: float) -> dict:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sent, received = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "received": 0, "chunks": 0}
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    error = None
    started = time.monotonic()
    try:
        while not stop.is_set():
            chunk = os.urandom(CHUNK)
            sock.sendall(chunk)
            sent.update(chunk)
            counts["sent"] += len(chunk)
            counts["chunks"] += 1
            while counts["received"] < counts["sent"]:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the connection was closed by the other side")
                received.update(data)
                counts["received"] += len(data)
            time.sleep(interval)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(65536):
            received.update(data)
            counts["received"] += len(data)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return {**counts, "sent_sha256": sent.hexdigest(), "received_sha256": received.hexdigest(), "error": error,
            "seconds": round(time.monotonic() - started, 3)}


def _context(side: int, cert: str, key: str) -> ssl.SSLContext:
    from agent.identity.tls import ALPN

    ctx = ssl.SSLContext(side)
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an impostor does not care who the other side is
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_cert_chain(cert, key)
    return ctx


def rogue_server(bind: str, cert: str, key: str) -> None:
    host, _, port = bind.rpartition(":")
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, cert, key)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(16)
    print(json.dumps({"listening": bind}), flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                tls.recv(1024)  # the dialer hangs up once it has judged our certificate
        except (OSError, ssl.SSLError):
            pass


def rogue_client(address: str, cert: str, key: str, sni: str) -> dict:
    host, _, port = address.rpartition(":")
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cert, key)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.settimeout(5)
            data = tls.recv(1024)  # TLS 1.3: a rejected client certificate shows up on the first read
            return {"handshake": "completed", "read": len(data), "error": None}
    except (OSError, ssl.SSLError) as exc:
        return {"handshake": "failed", "error": f"{type(exc).__name__}: {exc}"}


def peer_cert(address: str, sni: str) -> dict:
    """The leaf certificate an agent's inbound port presents for ``sni`` (PEM), read without a client
    certificate: in TLS 1.3 the server's certificate arrives before it judges the client's."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            return {"pem": ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)), "error": None}
    except (OSError, ssl.SSLError) as exc:
        return {"pem": None, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--connect", required=True)
    s.add_argument("--interval", type=float, default=0.02)
    pc = sub.add_parser("peer-cert")
    pc.add_argument("--connect", required=True)
    pc.add_argument("--sni", required=True)
    r = sub.add_parser("rogue-server")
    r.add_argument("--bind", required=True)
    c = sub.add_parser("rogue-client")
    c.add_argument("--connect", required=True)
    c.add_argument("--sni", required=True)
    for p in (r, c):
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    if args.command == "stream":
        print(json.dumps(stream(args.connect, args.interval)), flush=True)
    elif args.command == "peer-cert":
        print(json.dumps(peer_cert(args.connect, args.sni)), flush=True)
    elif args.command == "rogue-server":
        rogue_server(args.bind, args.cert, args.key)
    else:
        print(json.dumps(rogue_client(args.connect, args.cert, args.key, args.sni)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
