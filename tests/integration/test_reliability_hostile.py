"""Hostile input at the inbound port, deadlines and connection caps — both nodes' proxies in one
process on loopback (the world of test_proxy_loopback.py), with short deadlines.

Every hostile peer must be cut off within a bounded time, leave one flow record with a clear
``response_flags`` (counted in ``tcpmesh_tcp_connections_failed_total``), and the inbound proxy must
keep serving a legitimate client meanwhile. docs/reliability.md lists the cases and the flags.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import ssl
import time

import pytest

from agent.cli import run_event_loop
from agent.identity.ca import init_ca, load_ca
from agent.identity.store import IdentityStore
from agent.identity.tls import ALPN
from agent.connection import flow as F
from agent.proxy import mux as M
from agent.proxy.deadlines import reset_idle, sweep_idle_relays
from agent.connection.facts import ConnectionFacts
from agent.proxy.header import Status, decode_status_body, encode_connect_body
from agent.proxy.inbound import InboundProxy
from agent.proxy.limits import ConnectionLimits
from agent.proxy.outbound import OutboundProxy
from tests.integration.test_proxy_loopback import CLIENT_IP, NODE1, NODE2, SERVER_IP, TD, Mesh, free_port

HANDSHAKE_TIMEOUT = 0.6
STREAM_IDLE = 0.8
SLACK = 1.5  # scheduling slack on a loaded 2-core machine


class World:
    def __init__(self, mesh: Mesh, echo_port: int, digest_port: int) -> None:
        self.mesh = mesh
        self.echo_port = echo_port
        self.digest_port = digest_port
        self.src = mesh.contexts["node1"]
        self.dst = mesh.contexts["node2"]

    def client_store(self, ca=None) -> IdentityStore:
        """A fresh store for a hand-made client (so changing its contexts touches nobody else's)."""
        store = IdentityStore(ca or self.mesh.ca, (ca or self.mesh.ca).cert_pem, 600)
        store.ensure([self.web])
        return store

    @property
    def web(self):
        return self.mesh.registry.by_ip(CLIENT_IP).spiffe_id

    @property
    def sni(self) -> str:
        return self.mesh.registry.by_ip(SERVER_IP).spiffe_id.sni

    def failed(self, ctx, flag: str) -> float:
        total = 0.0
        for metric in ctx.metrics.registry.collect():
            if metric.name == "tcpmesh_tcp_connections_failed":
                total += sum(s.value for s in metric.samples
                             if s.name.endswith("_total") and s.labels["response_flags"] == flag)
        return total


def run_world(tmp_path, body, loop_kind="uvloop", configure=None):
    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def digest(reader, writer):
        h = hashlib.sha256()
        while chunk := await reader.read(65536):
            h.update(chunk)
        writer.write(h.hexdigest().encode())
        await writer.drain()
        writer.close()

    async def scenario():
        loop = asyncio.get_running_loop()
        inbound_port = free_port(NODE2)
        echo_port, digest_port = free_port(SERVER_IP), free_port(SERVER_IP)
        mesh = Mesh(tmp_path, inbound_port, {"ip": SERVER_IP, "port": digest_port})
        outbound = OutboundProxy(mesh.context("node1", loop), mesh.read_origin)
        inbound = InboundProxy(mesh.context("node2", loop))
        for ctx in mesh.contexts.values():
            ctx.handshake_timeout = HANDSHAKE_TIMEOUT
            ctx.inbound_idle_timeout = 30.0
        world = World(mesh, echo_port, digest_port)
        if configure is not None:
            configure(world)
        servers = [await asyncio.start_server(echo, SERVER_IP, echo_port),
                   await asyncio.start_server(digest, SERVER_IP, digest_port),
                   await loop.create_server(outbound.protocol_factory, NODE1, 0),
                   await loop.create_server(inbound.protocol_factory, NODE2, inbound_port)]
        mesh.outbound_address = servers[2].sockets[0].getsockname()[:2]
        world.outbound = outbound
        try:
            await body(world)
        finally:
            for server in servers:
                server.close()
            for ctx in mesh.contexts.values():
                await ctx.drain(0.5)
            outbound.pool.close_all("test over")

    run_event_loop(asyncio.wait_for(scenario(), 60), loop_kind)


async def legit_exchange(world: World, size: int = 10_000) -> None:
    """A real client through both proxies: must still work while hostile peers are around."""
    payload = os.urandom(size)
    world.mesh.origin = {"ip": SERVER_IP, "port": world.digest_port}
    sock = socket.socket()
    sock.bind((CLIENT_IP, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, world.mesh.outbound_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(payload)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert reply == hashlib.sha256(payload).hexdigest().encode()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Read until the server ends the connection (EOF, reset or a TLS alert); return the time it took."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return time.monotonic() - started


async def flows_with(ctx, flag: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for f in ctx.flows.snapshot() if f["end_time"] is not None and f["response_flags"] == flag]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {count} closed flow(s) with {flag}: {[(f['response_flags'], f['detail']) for f in ctx.flows.snapshot()]}")


async def raw(world: World):
    return await asyncio.open_connection(NODE2, world.mesh.inbound_port)


async def tls(world: World, context: ssl.SSLContext):
    return await asyncio.wait_for(asyncio.open_connection(NODE2, world.mesh.inbound_port, ssl=context,
                                                          server_hostname=world.sni), 5)


# ------------------------------------------------------------------------------------------ cases

async def plaintext(world):
    reader, writer = await raw(world)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return reader, writer


async def random_bytes(world):
    reader, writer = await raw(world)
    writer.write(random.Random(4096).randbytes(4096))  # the same "random" bytes every run
    return reader, writer


async def slowloris(world):
    reader, writer = await raw(world)
    writer.write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    return reader, writer


async def tls12_only(world):
    context = world.client_store().client_context_for(world.web)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    return await _tls_expecting_refusal(world, context)


async def wrong_alpn(world):
    context = world.client_store().client_context_for(world.web)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return await _tls_expecting_refusal(world, context)


async def no_certificate(world):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN])
    return await _tls_expecting_refusal(world, context)


async def foreign_ca(world):
    init_ca(TD, world.mesh.tmp_path / "foreign-ca")
    other = load_ca(world.mesh.tmp_path / "foreign-ca")
    context = world.client_store(other).client_context_for(world.web)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the impostor does not care who the server is
    return await _tls_expecting_refusal(world, context)


async def no_open(world):
    return await tls(world, world.client_store().client_context_for(world.web))


async def partial_open(world):
    reader, writer = await tls(world, world.client_store().client_context_for(world.web))
    frame = M.encode(M.FrameType.OPEN, 1, encode_connect_body(ConnectionFacts(SERVER_IP, world.echo_port)))
    writer.write(frame[:7])  # half a frame header, never the rest
    return reader, writer


async def _tls_expecting_refusal(world, context):
    """A TLS client the server must refuse; the refusal may come during or after the handshake."""
    try:
        return await tls(world, context)
    except (ssl.SSLError, ConnectionError, OSError):
        return None, None


HOSTILE = {
    # case: (how to be hostile, the inbound's response_flags, words in the detail)
    "plaintext": (plaintext, F.FLAG_TLS_FAILURE, "TLS handshake failed"),
    "random bytes": (random_bytes, F.FLAG_TLS_FAILURE, "TLS handshake failed"),
    "TLS 1.2 only": (tls12_only, F.FLAG_TLS_FAILURE, "TLS handshake failed"),
    "wrong ALPN": (wrong_alpn, F.FLAG_PROTOCOL_ERROR, "ALPN"),
    "no client certificate": (no_certificate, F.FLAG_TLS_FAILURE, "DID_NOT_RETURN_A_CERTIFICATE"),
    "certificate of a foreign CA": (foreign_ca, F.FLAG_TLS_FAILURE, "unknown CA"),
    "handshake never finishes (slowloris)": (slowloris, F.FLAG_HANDSHAKE_TIMEOUT, "TLS handshake within"),
    "tunnel never sends an OPEN": (no_open, F.FLAG_OPEN_TIMEOUT, "no complete OPEN"),
    "OPEN never completes": (partial_open, F.FLAG_OPEN_TIMEOUT, "no complete OPEN"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_cut_off_in_time_recorded_and_others_are_served(tmp_path, case):
    attack, flag, words = HOSTILE[case]

    async def body(world):
        world.mesh.tmp_path = tmp_path
        before = world.failed(world.dst, flag)
        reader, writer = await attack(world)
        await legit_exchange(world)  # served while the hostile peer is connected
        if reader is not None:
            took = await closed_within(reader, HANDSHAKE_TIMEOUT + SLACK + 5)
            assert took < HANDSHAKE_TIMEOUT + SLACK, f"{case}: the inbound proxy took {took:.2f}s to cut it off"
            writer.close()
        (record,) = [f for f in await flows_with(world.dst, flag) if words in f["detail"]]
        assert record["reporter"] == "destination" and record["source_ip"]
        assert world.failed(world.dst, flag) == before + 1
        await legit_exchange(world)  # and after
        # nothing of the hostile peer is left: only the listener-side tasks of legitimate tunnels
        deadline = time.monotonic() + 3
        while len(world.dst.tasks) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(world.dst.tasks) <= 1, world.dst.tasks  # the legit client's pooled tunnel

    run_world(tmp_path, body)


# 64 fixed bytes that look random (random.Random(21).randbytes(64)): a GOAWAY header claiming 3 GB
GARBAGE_64 = bytes.fromhex("07213a2ac1a1016bb89094b0f204046b375b8fa2967500480d54a67a1b1be1d7"
                           "56b74c37e35e5efd1805eaca7a7b8279178acfceb84295f60f553083122fff2e")


@pytest.mark.parametrize("garbage, words", [
    (M.encode(M.FrameType.DATA, 0, b"x"), "on stream 0"),
    (bytes([99, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), "unknown frame type 99"),
    (M.HEADER.pack(M.FrameType.DATA, 0, 0, 1, M.MAX_FRAME + 1), "exceeds the limit"),
    (M.encode(M.FrameType.OPEN, 2, b""), "unexpected OPEN"),
    (M.encode(M.FrameType.WINDOW, 1, b"\0\0\0\0"), "grants no credit"),          # the open stream
    (M.encode(M.FrameType.WINDOW, 9, b"\0\0\0\0"), "grants no credit"),          # a stream that never existed
    (M.encode(M.FrameType.WINDOW, 1, b"\0\0\1"), "has 3 payload bytes, not 4"),
    (GARBAGE_64, "exceeds the limit"),
], ids=["DATA on stream 0", "unknown type", "oversize", "even OPEN", "zero WINDOW", "zero WINDOW, no stream",
        "short WINDOW", "64 garbage bytes"])
def test_garbage_frames_after_the_handshake_end_the_tunnel_with_goaway(tmp_path, garbage, words):
    """docs/reliability.md: every one of these ends the tunnel at once with a GOAWAY naming the fault and
    a PROTOCOL_ERROR record (counted), and the proxy keeps serving others."""
    async def body(world):
        before = world.failed(world.dst, F.FLAG_PROTOCOL_ERROR)
        reader, writer = await tls(world, world.client_store().client_context_for(world.web))
        writer.write(M.encode(M.FrameType.OPEN, 1, encode_connect_body(ConnectionFacts(SERVER_IP, world.echo_port))))
        decoder = M.FrameDecoder()
        frames = decoder.feed(await asyncio.wait_for(reader.read(4096), 5))
        assert frames[0].type is M.FrameType.STATUS and decode_status_body(frames[0].payload).status is Status.OK
        writer.write(garbage)
        try:
            while data := await asyncio.wait_for(reader.read(4096), 5):
                frames += decoder.feed(data)
        except asyncio.TimeoutError:
            raise AssertionError(f"the tunnel was not closed after {garbage!r}") from None
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()
        kinds = [f.type for f in frames]
        assert kinds[-1] is M.FrameType.GOAWAY, kinds
        assert words in frames[-1].payload.decode(), frames[-1].payload
        record = (await flows_with(world.dst, F.FLAG_PROTOCOL_ERROR))[-1]
        assert "protocol error" in record["detail"] and words in record["detail"], record
        assert world.failed(world.dst, F.FLAG_PROTOCOL_ERROR) == before + 1
        await legit_exchange(world)

    run_world(tmp_path, body)


def test_a_stream_that_never_sends_is_reset_on_both_sides_after_the_idle_timeout(tmp_path):
    """A tunnel opens a stream to a real workload and then sends nothing: SI after the idle timeout."""
    async def body(world):
        sweeper = asyncio.get_running_loop().create_task(sweep_idle_relays(
            world.dst.relays, STREAM_IDLE, lambda relay, flow: reset_idle(relay, flow, STREAM_IDLE)))
        try:
            reader, writer = await tls(world, world.client_store().client_context_for(world.web))
            writer.write(M.encode(M.FrameType.OPEN, 1, encode_connect_body(ConnectionFacts(SERVER_IP, world.echo_port))))
            frames: list[M.Frame] = []
            decoder = M.FrameDecoder()
            started = time.monotonic()
            while M.FrameType.RST not in [f.type for f in frames]:
                data = await asyncio.wait_for(reader.read(4096), STREAM_IDLE + SLACK + 2)
                assert data, [f.type for f in frames]
                frames += decoder.feed(data)
            took = time.monotonic() - started
            assert STREAM_IDLE <= took < STREAM_IDLE + SLACK + 1, took
            (record,) = await flows_with(world.dst, F.FLAG_STREAM_IDLE_TIMEOUT)
            assert "proxy.stream_idle_timeout_seconds" in record["detail"]
            assert record["destination_workload"] == "db" and record["source_principal"] == world.web.uri
            await legit_exchange(world)
            writer.close()
        finally:
            sweeper.cancel()

    run_world(tmp_path, body)


def test_an_idle_inbound_tunnel_is_closed_with_goaway(tmp_path):
    def configure(world):
        world.dst.inbound_idle_timeout = 0.5

    async def body(world):
        reader, writer = await tls(world, world.client_store().client_context_for(world.web))
        writer.write(M.encode(M.FrameType.OPEN, 1, encode_connect_body(ConnectionFacts(SERVER_IP, world.echo_port))))
        writer.write(M.encode(M.FrameType.RST, 1, b"done"))  # the only stream ends at once
        decoder = M.FrameDecoder()
        frames: list[M.Frame] = []
        started = time.monotonic()
        while data := await asyncio.wait_for(reader.read(4096), 5):
            frames += decoder.feed(data)
        took = time.monotonic() - started
        assert frames[-1].type is M.FrameType.GOAWAY and b"proxy.inbound_tunnel_idle_seconds" in frames[-1].payload
        assert 0.5 <= took < 0.5 + SLACK + 1
        writer.close()
        assert not [f for f in world.dst.flows.snapshot() if f["response_flags"] == F.FLAG_OPEN_TIMEOUT]

    run_world(tmp_path, body, configure=configure)


# -------------------------------------------------------------------------------------------- caps

async def hold(world: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    world.mesh.origin = {"ip": SERVER_IP, "port": world.echo_port}
    sock = socket.socket()
    sock.bind((CLIENT_IP, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, world.mesh.outbound_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"ping")
    try:
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        raise ConnectionResetError("refused")
    return reader, writer


def hits(ctx, reporter: str, limit: str) -> float:
    return ctx.metrics.registry.get_sample_value("tcpmesh_connection_limit_hits_total",
                                                 {"reporter": reporter, "limit": limit})


@pytest.mark.parametrize("side, limit", [("destination", "per_identity"), ("destination", "total"),
                                         ("source", "per_identity"), ("source", "total")])
def test_connection_caps_refuse_the_next_connection_and_count_it(tmp_path, side, limit):
    def configure(world):
        ctx = world.dst if side == "destination" else world.src
        caps = {"total": (3, 0), "per_identity": (0, 3)}[limit]
        ctx.limits[side] = ConnectionLimits(side, *caps, lambda r, l: ctx.metrics.connection_limit_hits.labels(r, l).inc())

    async def body(world):
        ctx = world.dst if side == "destination" else world.src
        held = [await hold(world) for _ in range(3)]
        with pytest.raises(ConnectionResetError):
            await hold(world)
        assert hits(ctx, side, limit) == 1
        (src,) = await flows_with(world.src, F.FLAG_CONNECTION_LIMIT)
        assert "proxy.max_connections" in src["detail"]
        if side == "destination":
            (dst,) = await flows_with(world.dst, F.FLAG_CONNECTION_LIMIT)
            assert "OVERLOADED" in src["detail"] and dst["source_principal"] == world.web.uri
        held.pop()[1].close()  # one closes: there is room again
        deadline = time.monotonic() + 3
        while ctx.limits[side].active > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        held.append(await hold(world))
        assert ctx.limits[side].active == 3
        for _, writer in held:
            writer.close()
        deadline = time.monotonic() + 3
        while ctx.limits[side].active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert ctx.limits[side].active == 0 and ctx.limits[side].identities == 0

    run_world(tmp_path, body, configure=configure)
