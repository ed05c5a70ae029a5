"""Tiny TCP applications that play the workloads in the demo and the end-to-end tests.

They know nothing of tcpmesh: plain sockets, as an unchanged application would use them.
    python -m agent.demo.sampleapps server --port 7000 --mode echo|digest|banner
    python -m agent.demo.sampleapps client --connect 10.77.2.10:7000 --bytes 1048576 --mode echo|digest|banner
``echo`` returns every byte; ``digest`` reads until the client half-closes, then answers with the
sha256 and length of what it read (which proves half-close works end to end). ``banner`` is a
server-speaks-first protocol (like SMTP or MySQL): the server sends one greeting line on accept,
before reading anything, then behaves as ``digest``; the client sends nothing until it has read the
greeting (``--timeout`` bounds the wait). The server prints one JSON line per connection; the client
prints one JSON line with what it sent and received.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import socket
import sys
import threading

CHUNK = 64 * 1024
DEFAULT_GREETING = "220 tcpmesh-sample ESMTP ready"
PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Set the kernel's comm for this process, so flow records show a recognisable command."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(port: int, mode: str, once: bool, greeting: str = DEFAULT_GREETING) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    print(json.dumps({"listening": port, "mode": mode, "pid": os.getpid()}), flush=True)
    while True:
        conn, peer = listener.accept()
        worker = threading.Thread(target=_handle, args=(conn, peer, mode, greeting), daemon=True)
        worker.start()
        if once:
            worker.join()
            return


def _handle(conn: socket.socket, peer: tuple[str, int], mode: str, greeting: str) -> None:
    digest = hashlib.sha256()
    total = 0
    with conn:
        if mode == "banner":
            conn.sendall(greeting.encode() + b"\r\n")  # speak first, before reading anything
        while chunk := conn.recv(CHUNK):
            digest.update(chunk)
            total += len(chunk)
            if mode == "echo":
                conn.sendall(chunk)
        if mode in ("digest", "banner"):
            conn.sendall(f"{digest.hexdigest()} {total}\n".encode())
        conn.shutdown(socket.SHUT_WR)
    print(json.dumps({"peer": list(peer), "received": total, "sha256": digest.hexdigest()}), flush=True)


def run_client(address: str, size: int, mode: str, marker: str, timeout: float) -> dict:
    host, _, port = address.rpartition(":")
    payload = (marker.encode() + os.urandom(max(0, size - len(marker))))[:size] if size else marker.encode()
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    peer, local = sock.getpeername(), sock.getsockname()  # while connected: ENOTCONN once both sides closed
    received = hashlib.sha256()
    counts = {"received": 0}
    reply = bytearray()
    greeting = _read_greeting(sock, received, counts, reply) if mode == "banner" else b""

    failure: list[OSError] = []

    def reader() -> None:
        try:
            while chunk := sock.recv(CHUNK):
                received.update(chunk)
                counts["received"] += len(chunk)
                if mode in ("digest", "banner") and len(reply) < 4096:
                    reply.extend(chunk)
        except OSError as exc:  # e.g. reset by the mesh when a policy denies the connection
            failure.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # half-close: we are done sending, the reply still comes
    except OSError as exc:
        failure.append(exc)
    thread.join(timeout)
    if failure:
        # a reset seen by one thread leaves the other with ENOTCONN/EPIPE: report the reset
        raise next((exc for exc in failure if isinstance(exc, ConnectionResetError)), failure[0])
    result = {
        "pid": os.getpid(),
        "peer": list(peer),
        "local": list(local),
        "sent": len(payload),
        "sent_sha256": hashlib.sha256(payload).hexdigest(),
        "received": counts["received"],
        "received_sha256": received.hexdigest(),
        "reply": reply.decode(errors="replace").strip() if mode in ("digest", "banner") else "",
        "greeting": greeting.decode(errors="replace").rstrip("\r\n"),
        "complete": not thread.is_alive(),
    }
    sock.close()
    return result


def _read_greeting(sock: socket.socket, received, counts: dict, reply: bytearray) -> bytes:
    """Read the server's first line before sending anything; bytes after it count as the reply."""
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(CHUNK)  # socket.timeout (an OSError) if the greeting never comes
        if not chunk:
            raise ConnectionError("connection closed before the server's greeting")
        received.update(chunk)
        counts["received"] += len(chunk)
        data.extend(chunk)
    line, _, rest = bytes(data).partition(b"\n")
    reply.extend(rest)
    return line + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo.sampleapps")
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--mode", choices=("echo", "digest", "banner"), default="echo")
    server.add_argument("--once", action="store_true", help="exit after one connection")
    server.add_argument("--name", default="demo-server")
    server.add_argument("--greeting", default=DEFAULT_GREETING, help="banner mode: the line sent on accept")
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True, help="IP:PORT")
    client.add_argument("--bytes", type=int, default=1024)
    client.add_argument("--mode", choices=("echo", "digest", "banner"), default="echo")
    client.add_argument("--marker", default="", help="plaintext marker the payload starts with")
    client.add_argument("--timeout", type=float, default=30.0)
    client.add_argument("--name", default="demo-client")
    args = parser.parse_args(argv)
    set_process_name(args.name)
    if args.role == "server":
        serve(args.port, args.mode, args.once, args.greeting)
        return 0
    try:
        result = run_client(args.connect, args.bytes, args.mode, args.marker, args.timeout)
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "errno": exc.errno}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
