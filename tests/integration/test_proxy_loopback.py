"""The proxies in-process on loopback: two nodes' outbound and inbound proxies, real TLS 1.3 mTLS,
real sockets, no BPF. The capture's answer (the original destination) is supplied by the test, which
is what the bpf tier proves the kernel does; everything after it is the product's own code.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl

import pytest
from prometheus_client import CollectorRegistry

from agent.capture.origin import Origin
from agent.cli import run_event_loop
from agent.identity.ca import init_ca, load_ca
from agent.identity.store import IdentityStore
from agent.connection import flow as F
from agent.identity.tls import ALPN
from agent.proxy import mux as M
from agent.proxy.header import Status, decode_status_body
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.server import ProxyContext
from agent.registry.static_file import parse_registry
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics

TD = "it.tcpmesh"
NODE1, NODE2 = "127.0.0.11", "127.0.0.12"
CLIENT_IP, SERVER_IP, OTHER_IP = "127.0.1.1", "127.0.2.1", "127.0.2.2"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Mesh:
    """Two in-process nodes; node1 hosts the client workload, node2 the servers."""

    def __init__(self, tmp_path, inbound_port: int, origin: dict) -> None:
        init_ca(TD, tmp_path / "ca")
        self.ca = load_ca(tmp_path / "ca")
        # the client's pod cgroup: a directory standing for it, whose id the fake origin records carry
        (tmp_path / "cgroup-web").mkdir(exist_ok=True)
        self.client_cgroup_id = os.stat(tmp_path / "cgroup-web").st_ino
        self.registry = parse_registry({
            "nodes": [{"name": "node1", "address": NODE1}, {"name": "node2", "address": NODE2}],
            "workloads": [
                {"name": "web", "namespace": "shop", "service_account": "web", "ip": CLIENT_IP, "node": "node1",
                 "cgroup": str(tmp_path / "cgroup-web")},
                {"name": "db", "namespace": "data", "service_account": "postgres", "ip": SERVER_IP, "node": "node2"},
                {"name": "cache", "namespace": "data", "service_account": "redis", "ip": OTHER_IP, "node": "node2"},
            ]}, TD)
        self.inbound_port = inbound_port
        self.origin = origin  # what the capture would answer for the next connection
        self.contexts: dict[str, ProxyContext] = {}

    def context(self, node: str, loop) -> ProxyContext:
        store = IdentityStore(self.ca, self.ca.cert_pem, 600)
        store.ensure(self.registry.identities_on(node))
        ctx = ProxyContext(loop=loop, node_name=node, registry=lambda: self.registry, identities=store,
                           metrics=Metrics(CollectorRegistry()), flows=FlowTable(), inbound_port=self.inbound_port,
                           connect_timeout=2.0)
        self.contexts[node] = ctx
        return ctx

    def read_origin(self, sock):
        if self.origin.get("missing"):  # no record for this connection
            return None
        if self.origin.get("packets_only"):  # ebpf-tc and iptables: the destination, but no process
            return Origin(self.origin["ip"], self.origin["port"], None, None, None, None, None)
        return Origin(self.origin["ip"], self.origin["port"], os.getpid(), os.getuid(), self.client_cgroup_id, 1,
                      "pytest")


@pytest.fixture(params=["asyncio", "uvloop"])
def run_mesh(tmp_path, request):
    """Starts both nodes' proxies and a half-close-aware backend; yields an async runner."""

    async def backend(reader, writer):
        digest = hashlib.sha256()
        while chunk := await reader.read(65536):
            digest.update(chunk)
        writer.write(digest.hexdigest().encode())  # reply after the client's half-close
        await writer.drain()
        writer.close()

    async def scenario(body):
        loop = asyncio.get_running_loop()
        inbound_port = free_port(NODE2)
        backend_port = free_port(SERVER_IP)
        mesh = Mesh(tmp_path, inbound_port, {"ip": SERVER_IP, "port": backend_port})
        outbound = OutboundProxy(mesh.context("node1", loop), mesh.read_origin)
        mesh.outbound = outbound
        inbound = InboundProxy(mesh.context("node2", loop))
        servers = [
            await asyncio.start_server(backend, SERVER_IP, backend_port),
            await loop.create_server(outbound.protocol_factory, NODE1, 0),
            await loop.create_server(inbound.protocol_factory, NODE2, inbound_port),
        ]
        mesh.outbound_address = servers[1].sockets[0].getsockname()[:2]
        try:
            await body(mesh)
        finally:
            for server in servers:
                server.close()
            for ctx in mesh.contexts.values():
                await ctx.drain(0.5)
            outbound.pool.close_all("test over")

    def run(body):
        run_event_loop(asyncio.wait_for(scenario(body), 30), request.param)

    return run


async def client_exchange(mesh, payload: bytes) -> bytes:
    sock = socket.socket()
    sock.bind((CLIENT_IP, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, mesh.outbound_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # half-close: the backend replies only after seeing our EOF
    reply = await reader.read()
    writer.close()
    return reply


async def wait_closed_flows(ctx: ProxyContext, count: int) -> list[dict]:
    for _ in range(100):
        flows = [f for f in ctx.flows.snapshot() if f["end_time"] is not None]
        if len(flows) >= count:
            return flows
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} closed flows, have {ctx.flows.snapshot()}")


def test_bytes_cross_the_tunnel_intact_with_half_close_and_identities(run_mesh):
    payload = os.urandom(4 * 1024 * 1024 + 17)

    async def body(mesh):
        reply = await client_exchange(mesh, payload)
        assert reply == hashlib.sha256(payload).hexdigest().encode()
        (src,) = await wait_closed_flows(mesh.contexts["node1"], 1)
        (dst,) = await wait_closed_flows(mesh.contexts["node2"], 1)
        for record, reporter in ((src, "source"), (dst, "destination")):
            assert record["reporter"] == reporter
            assert record["response_flags"] == "-", record["detail"]
            assert record["security"] == "mutual_tls"
            assert record["source_principal"] == f"spiffe://{TD}/ns/shop/sa/web"
            assert record["destination_principal"] == f"spiffe://{TD}/ns/data/sa/postgres"
            assert record["bytes_received"] == len(payload)
            assert record["bytes_sent"] == 64
        assert src["pid"] == os.getpid() and src["comm"] == "pytest"
        assert dst["source_workload"] == src["source_workload"] == "web"
        assert (dst["pid"], dst["comm"]) == (src["pid"], src["comm"])  # the destination names the client process
        assert dst["source_ip"] == CLIENT_IP
        assert src["flow_id"] == dst["flow_id"] != ""
        # the connection's facts crossed the tunnel as one value: both nodes record the same ones
        facts = ("flow_id", "source_ip", "source_port", "pid", "uid", "comm", "destination_ip", "destination_port")
        assert {k: dst[k] for k in facts} == {k: src[k] for k in facts}
        assert (src["cgroup_id"], dst["cgroup_id"]) == (mesh.client_cgroup_id, None)  # the cgroup id stays on the source node

    run_mesh(body)


def test_a_capture_that_sees_packets_not_processes_tunnels_without_a_client_process(run_mesh):
    async def body(mesh):
        mesh.origin["packets_only"] = True
        assert await client_exchange(mesh, b"x" * 1000) == hashlib.sha256(b"x" * 1000).hexdigest().encode()
        (src,) = await wait_closed_flows(mesh.contexts["node1"], 1)
        (dst,) = await wait_closed_flows(mesh.contexts["node2"], 1)
        for record in (src, dst):
            assert record["response_flags"] == "-", record["detail"]
            assert (record["pid"], record["uid"], record["comm"], record["cgroup_id"]) == (None, None, None, None)
        assert dst["source_workload"] == "web" and dst["flow_id"] == src["flow_id"]

    run_mesh(body)


def test_unreachable_destination_is_reported_before_any_payload(run_mesh):
    async def body(mesh):
        mesh.origin = {"ip": OTHER_IP, "port": free_port(OTHER_IP)}  # nothing listens there
        with pytest.raises(ConnectionResetError):  # a reset, not a clean FIN that would look like an answer
            await client_exchange(mesh, b"hello")
        (src,) = await wait_closed_flows(mesh.contexts["node1"], 1)
        (dst,) = await wait_closed_flows(mesh.contexts["node2"], 1)
        assert src["response_flags"] == F.FLAG_UPSTREAM_FAILURE and "UNREACHABLE" in src["detail"]
        assert dst["response_flags"] == F.FLAG_UPSTREAM_FAILURE
        assert dst["destination_principal"] == f"spiffe://{TD}/ns/data/sa/redis"

    run_mesh(body)


def test_inbound_rejects_a_client_without_a_mesh_certificate(run_mesh):
    async def body(mesh):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols([ALPN])
        sni = mesh.registry.by_ip(SERVER_IP).spiffe_id.sni
        reader, writer = await asyncio.open_connection(NODE2, mesh.inbound_port, ssl=ctx, server_hostname=sni)
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            await reader.read()  # TLS 1.3: the server's alert arrives after the client's handshake ends
        writer.close()
        (dst,) = await wait_closed_flows(mesh.contexts["node2"], 1)
        assert dst["response_flags"] == F.FLAG_TLS_FAILURE

    run_mesh(body)


def test_inbound_answers_a_bad_open_with_bad_request_and_garbage_with_goaway(run_mesh):
    async def body(mesh):
        store = IdentityStore(mesh.ca, mesh.ca.cert_pem, 600)
        web = mesh.registry.by_ip(CLIENT_IP).spiffe_id
        store.ensure([web])
        sni = mesh.registry.by_ip(SERVER_IP).spiffe_id.sni
        reader, writer = await asyncio.open_connection(NODE2, mesh.inbound_port,
                                                       ssl=store.client_context_for(web), server_hostname=sni)
        writer.write(M.encode(M.FrameType.OPEN, 1, b"\x81\x00"))  # a critical TLV nobody knows
        await writer.drain()
        decoder = M.FrameDecoder()
        frames: list[M.Frame] = []
        while len(frames) < 2:  # STATUS, then our stream's FIN
            frames += decoder.feed(await reader.read(4096))
        assert [f.type for f in frames] == [M.FrameType.STATUS, M.FrameType.FIN]
        reply = decode_status_body(frames[0].payload)
        assert reply.status is Status.BAD_REQUEST and "critical" in reply.reason
        (dst,) = await wait_closed_flows(mesh.contexts["node2"], 1)
        assert dst["response_flags"] == F.FLAG_PROTOCOL_ERROR and dst["source_principal"] == web.uri

        writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not frames at all: the whole tunnel goes
        await writer.drain()
        frames = decoder.feed(await reader.read(4096))
        assert [f.type for f in frames] == [M.FrameType.GOAWAY]
        assert await reader.read() == b""
        writer.close()
        flows = await wait_closed_flows(mesh.contexts["node2"], 2)
        assert "protocol error" in flows[-1]["detail"] and flows[-1]["response_flags"] == F.FLAG_PROTOCOL_ERROR

    run_mesh(body)


def test_outbound_refuses_a_server_presenting_another_identity(tmp_path):
    """Secure naming: a node that answers for the destination with a different (valid) SVID is refused."""
    from agent.identity.issue import issue_svid
    from agent.identity.tls import server_context

    async def body():
        loop = asyncio.get_running_loop()
        inbound_port = free_port(NODE2)
        mesh = Mesh(tmp_path, inbound_port, {"ip": SERVER_IP, "port": 7})
        impostor = issue_svid(mesh.ca, mesh.registry.by_ip(OTHER_IP).spiffe_id, 600)
        received, connections, rogue_done = bytearray(), [], asyncio.Event()

        async def rogue(reader, writer):  # reads everything the outbound proxy sends it, to the end
            connections.append(writer.get_extra_info("peername"))
            try:
                while chunk := await reader.read(65536):
                    received.extend(chunk)
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()
                rogue_done.set()

        rogue_server = await asyncio.start_server(rogue, NODE2, inbound_port,
                                                  ssl=server_context(impostor, mesh.ca.cert_pem))
        outbound = OutboundProxy(mesh.context("node1", loop), mesh.read_origin)
        server = await loop.create_server(outbound.protocol_factory, NODE1, 0)
        mesh.outbound_address = server.sockets[0].getsockname()[:2]
        try:
            with pytest.raises(ConnectionResetError):  # a reset, not a clean FIN
                await client_exchange(mesh, b"secret")
            (src,) = await wait_closed_flows(mesh.contexts["node1"], 1)
            assert src["response_flags"] == F.FLAG_IDENTITY_ERROR
            assert src["detail"] == (f"peer presented spiffe://{TD}/ns/data/sa/redis, "
                                     f"expected spiffe://{TD}/ns/data/sa/postgres")
            await asyncio.wait_for(rogue_done.wait(), 10)  # the impostor's side of the tunnel has ended
            assert len(connections) == 1, "the impostor was never reached: this test proved nothing"
            assert received == b"", "the outbound proxy sent bytes to an unverified peer"
        finally:
            server.close()
            rogue_server.close()
            await mesh.contexts["node1"].drain(0.5)
            outbound.pool.close_all("test over")

    asyncio.run(asyncio.wait_for(body(), 30))
