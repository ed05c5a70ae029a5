"""``python -m bench.hop_cpu``: the proxies' CPU per 1-byte round trip, both nodes in one process.

What docs/performance-latency.md ("The compiled hot path") measures its per-hop figures with: both
nodes' outbound and inbound proxies in this process (tests/integration/test_proxy_loopback.py's
``Mesh``: real TLS 1.3 mTLS on loopback, uvloop, no BPF), bench/loadgen.c as the echo server and a
1-byte ping-pong client in a child process. Each round trip crosses four proxy hops; the figures are
this process's user and system CPU per round trip (getrusage) and, with ``--profile``, the Python
function calls per round trip (cProfile's count: deterministic, unlike time on a shared machine).
``TCPMESH_HOTPATH=python`` runs the pure-Python reference of agent/proxy/hotpath.py. Loopback only;
needs no root. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from agent.proxy import hotpath
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from tests.integration.test_proxy_loopback import CLIENT_IP, NODE1, NODE2, SERVER_IP, Mesh, free_port

CLIENT = r"""
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.connect((sys.argv[2], int(sys.argv[3])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(200): s.send(b"x"); s.recv(16)
print("go", flush=True); sys.stdin.readline()
end = time.monotonic() + float(sys.argv[4]); lat = []
while time.monotonic() < end:
    t = time.perf_counter_ns(); s.send(b"x"); s.recv(16); lat.append(time.perf_counter_ns() - t)
lat.sort(); n = len(lat)
print(n, lat[n // 2] / 1000, lat[int(n * 0.99)] / 1000, flush=True)
"""


def loadgen(workdir: Path) -> str:
    binary = workdir / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(Path(__file__).with_name("loadgen.c"))], check=True)
    return str(binary)


async def measure(seconds: float, profile: bool, workdir: Path) -> dict:
    loop = asyncio.get_running_loop()
    port = free_port(SERVER_IP)
    server = subprocess.Popen([loadgen(workdir), "serve", str(port)], stdout=subprocess.PIPE)
    client = None
    try:
        server.stdout.readline()  # type: ignore[union-attr]
        inbound_port = free_port(NODE2)
        mesh = Mesh(workdir, inbound_port, {"ip": SERVER_IP, "port": port})
        outbound = OutboundProxy(mesh.context("node1", loop), mesh.read_origin)
        inbound = InboundProxy(mesh.context("node2", loop))
        listeners = [await loop.create_server(outbound.protocol_factory, NODE1, 0),
                     await loop.create_server(inbound.protocol_factory, NODE2, inbound_port)]
        client = subprocess.Popen([sys.executable, "-c", CLIENT, CLIENT_IP, NODE1,
                                   str(listeners[0].sockets[0].getsockname()[1]), str(seconds)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = await loop.run_in_executor(None, client.stdout.readline)  # type: ignore[union-attr]
        if ready.strip() != "go":
            raise RuntimeError(f"the client did not start: {ready!r}")
        collections: list[int] = []
        gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info["generation"]))
        profiler = cProfile.Profile() if profile else None
        before = resource.getrusage(resource.RUSAGE_SELF)
        if profiler is not None:
            profiler.enable()
        client.stdin.write("\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        line = await loop.run_in_executor(None, client.stdout.readline)  # type: ignore[union-attr]
        if profiler is not None:
            profiler.disable()
        after = resource.getrusage(resource.RUSAGE_SELF)
        count, p50, p99 = line.split()
        n = int(count)
        result = {"data_path": hotpath.name(), "round_trips": n, "rtt_p50_us": float(p50), "rtt_p99_us": float(p99),
                  "user_us_per_round_trip": round((after.ru_utime - before.ru_utime) * 1e6 / n, 1),
                  "system_us_per_round_trip": round((after.ru_stime - before.ru_stime) * 1e6 / n, 1),
                  "gc_collections": {g: collections.count(g) for g in (0, 1, 2)}}
        if profiler is not None:
            stats = pstats.Stats(profiler)
            result["python_calls_per_round_trip"] = round(stats.total_calls / n, 1)  # type: ignore[attr-defined]
            calls = sorted(((nc / n, f"{Path(f).name}:{line}:{fn}") for (f, line, fn), (_cc, nc, *_rest)
                            in stats.stats.items()), reverse=True)  # type: ignore[attr-defined]
            result["calls_per_round_trip_by_function"] = {name: round(per, 2) for per, name in calls if per >= 0.5}
        for listener in listeners:
            listener.close()
        outbound.pool.close_all("measured")
        return result
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--profile", action="store_true", help="count Python calls (slows the loop: CPU figures rise)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tcpmesh-hop-") as tmp:
        started = time.monotonic()
        result = uvloop.run(measure(args.seconds, args.profile, Path(tmp)))
        result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
