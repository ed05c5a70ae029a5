"""Rotation under load, in-process on loopback: two nodes, each with its own node intermediate and a
running IdentityRotator with a TTL of seconds (identity.dev_short_ttl). A long-lived connection
streams through both proxies across several renewals without an error, while every new handshake
on the nodes' TLS contexts presents the current (new) serial on both sides. Also: what the admin
endpoint and `tcpmesh cert inspect` show, with no key material anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from prometheus_client import CollectorRegistry

from agent.capture.origin import Origin
from agent.cli import main
from agent.identity.ca import init_ca
from agent.identity.node_ca import issue_node_files
from agent.identity.svid_rotator import CaSource, IdentityRotator
from agent.identity.svid import DEV_MIN_TTL_SECONDS
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.server import ProxyContext
from agent.registry.static_file import parse_registry
from agent.telemetry.admin import AdminServer
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics

TD = "rot.tcpmesh"
NODE1, NODE2 = "127.0.0.21", "127.0.0.22"
CLIENT_IP, SERVER_IP = "127.0.3.1", "127.0.4.1"
TTL = 8  # seconds: a renewal about every four (shorter TTLs expired under load: each renewal runs a minting worker)
RENEWALS = 3
CHUNK = 16 * 1024


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


class Node:
    def __init__(self, tmp_path, name: str, registry, ttl: float = TTL) -> None:
        self.name = name
        self.metrics = Metrics(CollectorRegistry())
        issue_node_files(tmp_path / "root", name, tmp_path / name)
        self.rotator = IdentityRotator(CaSource(str(tmp_path / name), node=name), ttl_seconds=ttl,
                                       min_ttl_seconds=DEV_MIN_TTL_SECONDS, metrics=self.metrics, poll_seconds=0.5)
        self.rotator.store.ensure(registry.identities_on(name))
        self.flows = FlowTable()

    def renewals(self, spiffe_id) -> float:
        return self.metrics.registry.get_sample_value("tcpmesh_certificate_renewals_total",
                                                      {"workload": spiffe_id.uri}) or 0


def registry_of_two_nodes(web_cgroup: Path):
    """``web_cgroup``: a directory standing for the client's pod cgroup (the fake origin carries its id)."""
    web_cgroup.mkdir(exist_ok=True)
    return parse_registry({
        "nodes": [{"name": "node1", "address": NODE1}, {"name": "node2", "address": NODE2}],
        "workloads": [
            {"name": "web", "namespace": "shop", "service_account": "web", "ip": CLIENT_IP, "node": "node1",
             "cgroup": str(web_cgroup)},
            {"name": "db", "namespace": "data", "service_account": "postgres", "ip": SERVER_IP, "node": "node2"},
        ]}, TD)


def web_cgroup_id(registry) -> int:
    return os.stat(registry.by_ip(CLIENT_IP).cgroup).st_ino


@pytest.fixture
def two_nodes(tmp_path):
    init_ca(TD, tmp_path / "root")
    registry = registry_of_two_nodes(tmp_path / "cgroup-web")
    return registry, Node(tmp_path, "node1", registry), Node(tmp_path, "node2", registry)


def test_long_lived_flow_streams_across_renewals_while_new_handshakes_use_new_serials(two_nodes) -> None:
    registry, node1, node2 = two_nodes
    web, db = registry.by_ip(CLIENT_IP).spiffe_id, registry.by_ip(SERVER_IP).spiffe_id

    async def echo(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def probe(reader, writer):
        """A server on node2's inbound context: reports the client serial it saw, then hangs up."""
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"{serial_of(der):x}\n".encode())
        await writer.drain()
        writer.close()

    async def scenario():
        loop = asyncio.get_running_loop()
        inbound_port, backend_port, probe_port = free_port(NODE2), free_port(SERVER_IP), free_port(NODE2)
        contexts = {}
        for node in (node1, node2):
            contexts[node.name] = ProxyContext(loop=loop, node_name=node.name, registry=lambda: registry,
                                               identities=node.rotator.store, metrics=node.metrics, flows=node.flows,
                                               inbound_port=inbound_port, connect_timeout=2.0)
        origin = Origin(SERVER_IP, backend_port, os.getpid(), os.getuid(), web_cgroup_id(registry), 1, "pytest")
        outbound = OutboundProxy(contexts["node1"], lambda sock: origin)
        inbound = InboundProxy(contexts["node2"])
        servers = [await asyncio.start_server(echo, SERVER_IP, backend_port),
                   await loop.create_server(outbound.protocol_factory, NODE1, 0),
                   await loop.create_server(inbound.protocol_factory, NODE2, inbound_port),
                   await asyncio.start_server(probe, NODE2, probe_port, ssl=node2.rotator.store.server_context)]
        outbound_address = servers[1].sockets[0].getsockname()[:2]
        rotations = [loop.create_task(node.rotator.run()) for node in (node1, node2)]

        async def app_connection():
            sock = socket.socket()
            sock.bind((CLIENT_IP, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, outbound_address)
            return await asyncio.open_connection(sock=sock)

        async def new_handshake() -> tuple[int, int, set[int], set[int]]:
            """(server serial seen, client serial seen, serials the stores held around the handshake)."""
            held_db, held_web = {node2.rotator.store.svid(db).serial}, {node1.rotator.store.svid(web).serial}
            reader, writer = await asyncio.open_connection(
                NODE2, probe_port, ssl=node1.rotator.store.client_context_for(web), server_hostname=db.sni)
            server_serial = serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            client_serial = int((await reader.readline()).decode(), 16)
            writer.close()
            held_db.add(node2.rotator.store.svid(db).serial)
            held_web.add(node1.rotator.store.svid(web).serial)
            return server_serial, client_serial, held_db, held_web

        try:
            reader, writer = await app_connection()
            sent, received = hashlib.sha256(), hashlib.sha256()
            sent_bytes = received_bytes = 0
            server_serials, client_serials, short_flows = set(), set(), 0
            deadline = time.monotonic() + 60
            next_probe = 0.0
            while min(node1.renewals(web), node2.renewals(db)) < RENEWALS:
                assert time.monotonic() < deadline, "renewals did not happen in time"
                chunk = os.urandom(CHUNK)
                writer.write(chunk)
                sent.update(chunk)
                sent_bytes += len(chunk)
                await writer.drain()
                while received_bytes < sent_bytes:  # the echo comes back through both proxies
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    assert data, "the long-lived connection was closed"
                    received.update(data)
                    received_bytes += len(data)
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + 0.25
                    server_serial, client_serial, held_db, held_web = await new_handshake()
                    assert server_serial in held_db and client_serial in held_web
                    server_serials.add(server_serial)
                    client_serials.add(client_serial)
                    r2, w2 = await app_connection()  # a new application connection works at every moment
                    w2.write(b"ping")
                    w2.write_eof()
                    assert await asyncio.wait_for(r2.read(), 5) == b"ping"
                    w2.close()
                    short_flows += 1
                await asyncio.sleep(0.01)
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 5)
            received.update(rest)
            received_bytes += len(rest)
            writer.close()
            assert received_bytes == sent_bytes and received.digest() == sent.digest()
            assert len(server_serials) >= RENEWALS and len(client_serials) >= RENEWALS, (server_serials, client_serials)
            for _ in range(100):  # the long-lived flow and the short ones closed clean on both nodes
                closed = [f for node in (node1, node2) for f in node.flows.snapshot() if f["end_time"] is not None]
                if len(closed) >= 2 * (short_flows + 1):
                    break
                await asyncio.sleep(0.02)
            assert [f for f in closed if f["response_flags"] != "-"] == []
            long_lived = [f for f in closed if f["bytes_received"] == sent_bytes]
            assert len(long_lived) == 2 and all(f["duration_seconds"] > 1.0 for f in long_lived)
            logging.getLogger("test").warning("long-lived flow: %d bytes over %.1fs; renewals web=%d db=%d; "
                                              "distinct serials seen server=%d client=%d", sent_bytes,
                                              long_lived[0]["duration_seconds"], node1.renewals(web),
                                              node2.renewals(db), len(server_serials), len(client_serials))
        finally:
            for task in rotations:
                task.cancel()
            for server in servers:
                server.close()
            for ctx in contexts.values():
                await ctx.drain(0.5)
            pool = getattr(outbound, "pool", None)
            if pool is not None:
                pool.close_all("test over")

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_new_connections_work_after_the_client_s_first_svid_expired_while_its_tunnel_is_held(tmp_path) -> None:
    """The destination takes no new streams on a tunnel whose client certificate has expired (#15 item 1).
    The client's SVID lives seconds, the server's an hour, and a connection held on the first tunnel
    keeps that tunnel open past the client's first SVID: a new connection after that expiry still goes
    through (a renewed client context is a new pool key, and a refused stream is retried on a new
    tunnel), and the held connection is not cut."""
    init_ca(TD, tmp_path / "root")
    registry = registry_of_two_nodes(tmp_path / "cgroup-web")
    node1, node2 = Node(tmp_path, "node1", registry, ttl=TTL), Node(tmp_path, "node2", registry, ttl=3600)
    web = registry.by_ip(CLIENT_IP).spiffe_id

    async def echo(reader, writer):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def scenario():
        loop = asyncio.get_running_loop()
        inbound_port, backend_port = free_port(NODE2), free_port(SERVER_IP)
        contexts = {node.name: ProxyContext(loop=loop, node_name=node.name, registry=lambda: registry,
                                            identities=node.rotator.store, metrics=node.metrics, flows=node.flows,
                                            inbound_port=inbound_port, connect_timeout=2.0) for node in (node1, node2)}
        origin = Origin(SERVER_IP, backend_port, os.getpid(), os.getuid(), web_cgroup_id(registry), 1, "pytest")
        outbound = OutboundProxy(contexts["node1"], lambda sock: origin)
        inbound = InboundProxy(contexts["node2"])
        servers = [await asyncio.start_server(echo, SERVER_IP, backend_port),
                   await loop.create_server(outbound.protocol_factory, NODE1, 0),
                   await loop.create_server(inbound.protocol_factory, NODE2, inbound_port)]
        outbound_address = servers[1].sockets[0].getsockname()[:2]
        rotation = loop.create_task(node1.rotator.run())

        async def connect():
            sock = socket.socket()
            sock.bind((CLIENT_IP, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, outbound_address)
            return await asyncio.open_connection(sock=sock)

        async def ping() -> bytes:
            reader, writer = await connect()
            writer.write(b"ping")
            writer.write_eof()
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        try:
            first_not_after = node1.rotator.store.svid(web).not_after.timestamp()
            held_reader, held_writer = await connect()  # keeps the first tunnel (first client SVID) open
            held_writer.write(b"held")
            assert await asyncio.wait_for(held_reader.readexactly(4), 5) == b"held"
            while time.time() < first_not_after + 1:
                await asyncio.sleep(0.2)
            assert node1.rotator.store.svid(web).not_after.timestamp() > first_not_after, "no renewal happened"
            assert await ping() == b"ping", "a new connection after the client's first SVID expired failed"
            held_writer.write(b"still")  # the held connection is not cut by the new tunnel
            assert await asyncio.wait_for(held_reader.readexactly(5), 5) == b"still"
            held_writer.close()
        finally:
            rotation.cancel()
            for server in servers:
                server.close()
            for ctx in contexts.values():
                await ctx.drain(0.5)
            outbound.pool.close_all("test over")

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_admin_endpoint_and_cert_inspect_show_serials_and_roots_but_no_keys(two_nodes, caplog) -> None:
    registry, node1, _ = two_nodes
    web = registry.by_ip(CLIENT_IP).spiffe_id
    caplog.set_level(logging.DEBUG)
    node1.rotator.store.renew([web])  # one renewal logged
    admin = AdminServer("127.0.0.1", 0, node1.metrics.registry, is_ready=lambda: True, flows=lambda: [],
                        certs=lambda: node1.rotator.report({web: ["web"]}))
    admin.start()
    try:
        url = f"http://127.0.0.1:{admin.address[1]}"
        doc = json.loads(urllib.request.urlopen(url + "/debug/certs").read())
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        out = CliRunner().invoke(main, ["cert", "inspect", "--admin", url, "--workload", "web"])
        as_json = CliRunner().invoke(main, ["cert", "inspect", "--admin", url, "--json"])
        missing = CliRunner().invoke(main, ["cert", "inspect", "--admin", url, "--workload", "nope"])
    finally:
        admin.stop()
    svid = node1.rotator.store.svid(web)
    (entry,) = doc["identities"]
    assert entry["spiffe_id"] == web.uri and entry["serial"] == f"{svid.serial:x}" and entry["renewals"] == 1
    assert entry["root"]["fingerprint"] == doc["node_ca"]["root"]["fingerprint"] == doc["trust_bundle"][0]["fingerprint"]
    assert out.exit_code == 0, out.output
    assert web.uri in out.output and f"{svid.serial:x}"[:16] in out.output and "node intermediate" in out.output
    assert json.loads(as_json.output)["identities"][0]["serial"] == entry["serial"]
    assert missing.exit_code == 2 and "serves no identity matching 'nope'" in missing.output
    assert f'tcpmesh_certificate_expiry_timestamp_seconds{{workload="{web.uri}"}}' in metrics
    assert f'tcpmesh_certificate_renewals_total{{workload="{web.uri}"}} 1.0' in metrics
    everything = json.dumps(doc) + metrics + out.output + as_json.output + caplog.text
    assert "-----BEGIN" not in everything and "PRIVATE KEY" not in everything
    assert "".join(svid.key_pem.splitlines()[1:-1])[:24] not in everything
    assert f"serial {svid.serial:x}" in caplog.text  # the renewal was logged, by serial
