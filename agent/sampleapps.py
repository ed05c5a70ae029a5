"""Tiny TCP applications that play the workloads in the demo and the end-to-end tests.

They know nothing of tcpmesh: plain sockets, as an unchanged application would use them.
    python -m agent.sampleapps server --port 7000 --mode echo|digest
    python -m agent.sampleapps client --connect 10.77.2.10:7000 --bytes 1048576 --mode echo|digest
``echo`` returns every byte; ``digest`` reads until the client half-closes, then answers with the
sha256 and length of what it read (which proves half-close works end to end). The server prints one
JSON line per connection; the client prints one JSON line with what it sent and received.
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
PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Set the kernel's comm for this process, so flow records show a recognisable command."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(port: int, mode: str, once: bool) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    print(json.dumps({"listening": port, "mode": mode, "pid": os.getpid()}), flush=True)
    while True:
        conn, peer = listener.accept()
        worker = threading.Thread(target=_handle, args=(conn, peer, mode), daemon=True)
        worker.start()
        if once:
            worker.join()
            return


def _handle(conn: socket.socket, peer: tuple[str, int], mode: str) -> None:
    digest = hashlib.sha256()
    total = 0
    with conn:
        while chunk := conn.recv(CHUNK):
            digest.update(chunk)
            total += len(chunk)
            if mode == "echo":
                conn.sendall(chunk)
        if mode == "digest":
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

    failure: list[OSError] = []

    def reader() -> None:
        try:
            while chunk := sock.recv(CHUNK):
                received.update(chunk)
                counts["received"] += len(chunk)
                if mode == "digest" and len(reply) < 4096:
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
        raise failure[0]
    result = {
        "pid": os.getpid(),
        "peer": list(peer),
        "local": list(local),
        "sent": len(payload),
        "sent_sha256": hashlib.sha256(payload).hexdigest(),
        "received": counts["received"],
        "received_sha256": received.hexdigest(),
        "reply": reply.decode(errors="replace").strip() if mode == "digest" else "",
        "complete": not thread.is_alive(),
    }
    sock.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.sampleapps")
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--mode", choices=("echo", "digest"), default="echo")
    server.add_argument("--once", action="store_true", help="exit after one connection")
    server.add_argument("--name", default="demo-server")
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True, help="IP:PORT")
    client.add_argument("--bytes", type=int, default=1024)
    client.add_argument("--mode", choices=("echo", "digest"), default="echo")
    client.add_argument("--marker", default="", help="plaintext marker the payload starts with")
    client.add_argument("--timeout", type=float, default=30.0)
    client.add_argument("--name", default="demo-client")
    args = parser.parse_args(argv)
    set_process_name(args.name)
    if args.role == "server":
        serve(args.port, args.mode, args.once)
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
