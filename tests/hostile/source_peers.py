"""Peers the source-address attacks run inside lab namespaces (``python tests/hostile/source_peers.py ...``).

    whoami --port PORT               a server (IPv4 and IPv6) that answers every connection with the address
                                     it came from (what pg_hba.conf, inet_client_addr() or CLIENT LIST see),
                                     then closes
    open --connect IP:PORT --cert CHAIN --key KEY --sni NAME --dest IP:PORT --source IP
                                     a node's outbound proxy played by hand: one tcpmesh/2 tunnel with the
                                     given certificate, one OPEN naming ``--source`` as the client pod's
                                     address; prints one JSON line: the STATUS and what the server sent

Plain Python, the ssl module and tcpmesh's own frame codec (an attacker can read the protocol too).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys

from agent.connection.facts import ConnectionFacts
from agent.proxy import header as H
from agent.proxy import mux as M


def whoami(port: int) -> None:
    listener = socket.create_server(("::", port), family=socket.AF_INET6, backlog=16, dualstack_ipv6=True)
    print("listening", flush=True)
    while True:
        conn, peer = listener.accept()
        conn.sendall(f"{peer[0].removeprefix('::ffff:')}\n".encode())  # an IPv4 client as IPv4
        conn.close()


def open_stream(address: str, cert: str, key: str, sni: str, dest: str, source: str) -> dict:
    host, _, port = address.rpartition(":")
    dest_ip, _, dest_port = dest.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who answers
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["tcpmesh/2"])
    request = ConnectionFacts(destination_ip=dest_ip, destination_port=int(dest_port),
                              flow_id=os.urandom(H.FLOW_ID_LEN), source_ip=source, source_port=40000 if source else 0)
    result: dict = {"status": None, "reason": "", "data": "", "error": None}
    decoder = M.FrameDecoder()
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(M.encode(M.FrameType.OPEN, 1, H.encode_connect_body(request)))
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                for frame in decoder.feed(chunk):
                    if frame.type == M.FrameType.STATUS:
                        reply = H.decode_status_body(frame.payload)
                        result["status"], result["reason"] = reply.status.name, reply.reason
                    elif frame.type == M.FrameType.DATA:
                        result["data"] += bytes(frame.payload).decode(errors="replace")
                    elif frame.type in (M.FrameType.FIN, M.FrameType.RST, M.FrameType.GOAWAY):
                        return result
    except (OSError, ssl.SSLError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("whoami")
    w.add_argument("--port", type=int, required=True)
    o = sub.add_parser("open")
    for name in ("--connect", "--cert", "--key", "--sni", "--dest", "--source"):
        o.add_argument(name, required=True)
    args = parser.parse_args(argv)
    if args.command == "whoami":
        whoami(args.port)
    else:
        print(json.dumps(open_stream(args.connect, args.cert, args.key, args.sni, args.dest, args.source)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
