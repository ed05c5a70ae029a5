"""A bulk transfer that proves its bytes arrived whole: for kernel TLS against user-space TLS (bench/kernel_tls.py).

``serve PORT``: accepts connections one after another; reads each to its end (the client's FIN) and
answers ``<sha256 hex> <length>`` of what it read, then closes. ``send HOST PORT BYTES``: sends BYTES
random bytes, half-closes, reads the answer to the end and prints one JSON line: the lengths and digests
sent and received, whether they match, the seconds from connect to the answer. So both directions and
the half-close cross the path. Standard library only: it starts fast in a pod under emulation.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 256 * 1024


def serve(listener: socket.socket) -> None:
    """Answer each connection of ``listener`` in turn; a client that goes away ends only its connection."""
    while True:
        conn, _ = listener.accept()
        with conn:
            digest, length = hashlib.sha256(), 0
            try:
                while True:
                    data = conn.recv(CHUNK)
                    if not data:
                        break
                    digest.update(data)
                    length += len(data)
                conn.sendall(f"{digest.hexdigest()} {length}\n".encode())
            except OSError:
                continue


def send(host: str, port: int, size: int) -> dict:
    payload = os.urandom(size)
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=300) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(payload)
        for offset in range(0, size, CHUNK):
            conn.sendall(view[offset:offset + CHUNK])
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            data = conn.recv(4096)
            if not data:
                break
            answer += data
    seconds = time.monotonic() - started
    words = answer.decode(errors="replace").split()
    expected = hashlib.sha256(payload).hexdigest()
    received = words[0] if words else ""
    received_length = int(words[1]) if len(words) > 1 and words[1].isdigit() else -1
    return {"bytes": size, "sha256": expected, "received_sha256": received, "received_bytes": received_length,
            "match": received == expected and received_length == size, "seconds": round(seconds, 4)}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(socket.create_server(("0.0.0.0", int(argv[1])), backlog=8))
        return 0
    if len(argv) == 4 and argv[0] == "send":
        print(json.dumps(send(argv[1], int(argv[2]), int(argv[3]))), flush=True)
        return 0
    print("usage: python -m bench.checked_bulk serve PORT | send HOST PORT BYTES", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
