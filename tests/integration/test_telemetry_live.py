"""Live telemetry on loopback: an open connection's bytes reach the counters and the flow table
while it is open (and are never counted twice), and both nodes' access logs verify afterwards."""

from __future__ import annotations

import asyncio
import os
import socket

from prometheus_client import CollectorRegistry

from agent.audit.keys import read_keys
from agent.audit.verify import verify_files
from agent.audit.writer import AccessLog
from agent.capture.origin import Origin
from agent.identity.ca import init_ca, load_ca
from agent.identity.store import IdentityStore
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.server import ProxyContext
from agent.registry.static_file import parse_registry
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics

TD = "live.tcpmesh"
NODE1, NODE2 = "127.0.0.21", "127.0.0.22"
CLIENT_IP, SERVER_IP = "127.0.3.1", "127.0.4.1"
SOURCE = f"spiffe://{TD}/ns/shop/sa/web"
DESTINATION = f"spiffe://{TD}/ns/data/sa/postgres"
NO_SERVICE = {"destination_service": "unknown", "destination_service_name": "unknown",
              "destination_service_namespace": "unknown"}  # a pod address, not a Service


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, name, ca, registry, inbound_port, loop, log_path) -> None:
        store = IdentityStore(ca, ca.cert_pem, 600)
        store.ensure(registry.identities_on(name))
        self.metrics = Metrics(CollectorRegistry())
        self.access_log = AccessLog(str(log_path), key_path=str(log_path.parent.parent / "keys" / "audit.key"),
                                    node=name, metrics=self.metrics)
        self.access_log.start()
        self.ctx = ProxyContext(loop=loop, node_name=name, registry=lambda: registry, identities=store,
                                metrics=self.metrics, flows=FlowTable(access_log=self.access_log, log_open=True),
                                inbound_port=inbound_port, connect_timeout=2.0)

    def bytes(self, direction: str) -> float:
        labels = {"reporter": "source" if self.ctx.node_name == "node1" else "destination",
                  "source_workload": "web", "source_workload_namespace": "shop", "source_principal": SOURCE,
                  "destination_workload": "db", "destination_workload_namespace": "data",
                  "destination_principal": DESTINATION, "connection_security_policy": "mutual_tls",
                  "response_flags": "-", **NO_SERVICE}
        return self.metrics.registry.get_sample_value(f"tcpmesh_tcp_{direction}_bytes_total", labels) or 0.0


async def echo(reader, writer):
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def run_live(tmp_path) -> None:
    loop = asyncio.get_running_loop()
    init_ca(TD, tmp_path / "ca")
    ca = load_ca(tmp_path / "ca")
    registry = parse_registry({
        "nodes": [{"name": "node1", "address": NODE1}, {"name": "node2", "address": NODE2}],
        "workloads": [
            {"name": "web", "namespace": "shop", "service_account": "web", "ip": CLIENT_IP, "node": "node1",
             "cgroup": str(tmp_path / "cgroup-web")},
            {"name": "db", "namespace": "data", "service_account": "postgres", "ip": SERVER_IP, "node": "node2"}]}, TD)
    inbound_port, backend_port = free_port(NODE2), free_port(SERVER_IP)
    node1 = Node("node1", ca, registry, inbound_port, loop, tmp_path / "log" / "node1.log")
    node2 = Node("node2", ca, registry, inbound_port, loop, tmp_path / "log" / "node2.log")
    (tmp_path / "cgroup-web").mkdir()  # stands for the client's pod cgroup: the origin record carries its id
    origin = Origin(SERVER_IP, backend_port, os.getpid(), os.getuid(), os.stat(tmp_path / "cgroup-web").st_ino, 1,
                    "live-client")
    outbound = OutboundProxy(node1.ctx, lambda sock: origin)
    servers = [await asyncio.start_server(echo, SERVER_IP, backend_port),
               await loop.create_server(outbound.protocol_factory, NODE1, 0),
               await loop.create_server(InboundProxy(node2.ctx).protocol_factory, NODE2, inbound_port)]
    reporters = [loop.create_task(n.ctx.report_forever(0.05)) for n in (node1, node2)]
    try:
        sock = socket.socket()
        sock.bind((CLIENT_IP, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, servers[1].sockets[0].getsockname()[:2])
        reader, writer = await asyncio.open_connection(sock=sock)
        seen = []
        for _ in range(3):  # three bursts of 100 KiB, the connection stays open in between
            writer.write(os.urandom(100 * 1024))
            await writer.drain()
            await reader.readexactly(100 * 1024)
            await asyncio.sleep(0.2)
            seen.append((node1.bytes("received"), node2.bytes("received"), node1.bytes("sent")))
            (live,) = [f for f in node1.ctx.flows.query()["flows"] if f["state"] == "open"]
            assert live["bytes_received"] == seen[-1][0]
        assert [s[0] for s in seen] == [102400, 204800, 307200], seen  # growing while open
        assert [s[1] for s in seen] == [102400, 204800, 307200], seen
        assert [s[2] for s in seen] == [102400, 204800, 307200], seen
        assert node1.metrics.registry.get_sample_value(
            "tcpmesh_tcp_open_connections", {"reporter": "source", "source_workload": "web",
                                             "source_workload_namespace": "shop", "source_principal": SOURCE,
                                             "destination_workload": "db", "destination_workload_namespace": "data",
                                             "destination_principal": DESTINATION, **NO_SERVICE,
                                             "connection_security_policy": "mutual_tls"}) == 1
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        for _ in range(100):
            if not node1.ctx.relays and not node2.ctx.relays:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert node1.bytes("received") == node2.bytes("received") == 307200  # counted exactly once
    finally:
        for task in reporters:
            task.cancel()
        for server in servers:
            server.close()
        for node in (node1, node2):
            await node.ctx.drain(0.5)
        outbound.pool.close_all("test over")
        for node in (node1, node2):
            node.access_log.stop()


def test_an_open_connection_reports_growing_bytes_and_the_access_logs_verify(tmp_path):
    asyncio.run(asyncio.wait_for(run_live(tmp_path), 30))
    import json

    for name in ("node1", "node2"):
        path = str(tmp_path / "log" / f"{name}.log")
        result = verify_files([path], read_keys(str(tmp_path / "keys" / "audit.key")))
        assert result.ok, result.finding
        records = [json.loads(line) for line in open(path)]
        assert [r["event"] for r in records] == ["file", "open", "close"]
        close = records[-1]
        assert close["node"] == name and close["bytes_received"] == 307200 and close["decision"] == "allow"
        assert close["source_principal"] == SOURCE and close["destination_principal"] == DESTINATION
    source_close = json.loads(open(tmp_path / "log" / "node1.log").readlines()[-1])
    assert source_close["pid"] == os.getpid() and source_close["comm"] == "live-client"
    assert source_close["uid"] == os.getuid() and source_close["cgroup_id"] == os.stat(tmp_path / "cgroup-web").st_ino
