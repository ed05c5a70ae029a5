"""``python -m bench.hop_steps``: the interpreter's and TLS's CPU per hop of a 1-byte message, no sockets.

What docs/performance-latency.md ("The one-call tunnel read") compares its two implementations with,
because on the shared machine a socket round trip (``bench.hop_cpu``) swings more than the change: an
established tunnel (real TLS 1.3 between two ``TlsLeg``s, a server ``MuxSession``, one stream relayed to
a ``PlainLeg``) on in-memory transports whose writes go nowhere, driven the way uvloop drives it
(``get_buffer`` + ``buffer_updated``). Two hops, each timed in batches of 200 with the fastest batch
kept (the least disturbed by other processes): **tunnel → app** (TLS records of one DATA frame read,
decrypted, decoded, handed to the stream, relayed, written to the app's socket) and **app → tunnel**
(one byte read from the app, relayed to the stream, framed, sealed, written to the tunnel). A round
trip crosses each twice. ``--impl`` chooses the data path (agent.proxy.hotpath: ``compiled`` or
``python``, as ``TCPMESH_HOTPATH``). Needs no root; not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.proxy import mux as M
from agent.proxy.endpoints import PlainLeg
from agent.proxy.header import encode_connect_body
from agent.proxy.relay import Relay
from agent.proxy.session import MuxSession
from bench.tls_pair import MemoryTransport, connected_pair, tls_contexts, use_hotpath

BATCH = 200
OPEN_BODY = encode_connect_body(ConnectionFacts("10.0.0.1", 80, b"12345678", "10.0.0.2", 4000,
                                                ClientProcess(7, 0, "app")))


class Discard(MemoryTransport):
    """A socket that takes everything at once."""

    def write(self, data) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def measure(tls_contexts, batches: int) -> dict:
    client, client_transport, server = await connected_pair(tls_contexts)
    opened: list = []
    MuxSession(server, client=False, on_open=lambda stream, request: opened.append(stream)).start()
    client.write(M.encode(M.FrameType.OPEN, 1, OPEN_BODY))
    server.data_received(client_transport.take())
    (stream,) = opened
    app = PlainLeg()
    app.connection_made(Discard())
    Relay(app, stream).start()
    server.transport = Discard()  # what the tunnel sends (sealed records) goes nowhere
    records = []
    for _ in range(BATCH * batches):  # each DATA frame sealed in advance: TLS records cannot be replayed
        client.write_data_frame(1, b"x")
        records.append(client_transport.take())
    inbound = outbound = float("inf")
    pending = iter(records)
    for _ in range(batches):
        started = time.perf_counter_ns()
        for _ in range(BATCH):
            record = next(pending)
            server.get_buffer(len(record))[:len(record)] = record
            server.buffer_updated(len(record))
        inbound = min(inbound, time.perf_counter_ns() - started)
        started = time.perf_counter_ns()
        for _ in range(BATCH):
            app.get_buffer(1)[:1] = b"y"
            app.buffer_updated(1)
        outbound = min(outbound, time.perf_counter_ns() - started)
    if not app.bytes_written == stream.bytes_written == BATCH * batches:
        raise RuntimeError(f"bytes lost: {app.bytes_written} to the app, {stream.bytes_written} to the tunnel")
    inbound_us, outbound_us = inbound / BATCH / 1000, outbound / BATCH / 1000
    return {"tunnel_to_app_us": round(inbound_us, 2), "app_to_tunnel_us": round(outbound_us, 2),
            "round_trip_us": round(2 * (inbound_us + outbound_us), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["compiled", "python"], default="compiled")
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tcpmesh-steps-") as tmp, use_hotpath(args.impl):
        result = asyncio.run(measure(tls_contexts(Path(tmp), "hop"), args.batches))
    print(json.dumps({"data_path": args.impl, **result}))


if __name__ == "__main__":
    main()
