"""tcpmesh/2 sessions over a real TLS connection on loopback: many application connections share
one tunnel, bytes arrive intact both ways, half-close is carried per stream, a slow reader stalls
only its own stream, and a lost tunnel resets every stream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from agent.proxy.endpoints import PlainLeg, TlsLeg
from agent.connection.facts import ConnectionFacts
from agent.proxy.header import Status, StatusReply
from agent.proxy.pool import PoolKey, TunnelPool
from agent.proxy.relay import Relay
from agent.proxy.session import MuxSession
from agent.identity.spiffe import SpiffeId
from bench import tls_pair

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    return tls_pair.tls_contexts(tmp_path_factory.mktemp("tls"), "mux")


class Harness:
    """client app → [listener → Relay → Stream] ⇒ TLS ⇒ [Stream → Relay → PlainLeg] → backend."""

    def __init__(self, tls_contexts, backend_port: int) -> None:
        self.server_ctx, self.client_ctx = tls_contexts
        self.backend_port = backend_port
        self.server_sessions: list[MuxSession] = []
        self.pool = TunnelPool(self._dial)
        self.key = PoolKey(SpiffeId("t", "a", "b"), (HOST, 0), SpiffeId("t", "c", "d"))
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tunnel_server = await loop.create_server(self._accept_tunnel, HOST, 0)
        self.tunnel_port = self.tunnel_server.sockets[0].getsockname()[1]
        self.app_server = await loop.create_server(self._accept_app, HOST, 0)
        self.app_port = self.app_server.sockets[0].getsockname()[1]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # server side
    def _accept_tunnel(self) -> TlsLeg:
        leg = TlsLeg(self.server_ctx, server_side=True)
        self._spawn(self._serve_tunnel(leg))
        return leg

    async def _serve_tunnel(self, leg: TlsLeg) -> None:
        await leg.handshake_done
        session = MuxSession(leg, client=False, on_open=lambda s, r: self._spawn(self._serve_stream(s.session, s, r)))
        self.server_sessions.append(session)
        session.start()

    async def _serve_stream(self, session, stream, request) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: PlainLeg(start_paused=True), HOST, request.destination_port)
        except OSError as exc:
            session.send_status(stream, StatusReply(Status.UNREACHABLE, str(exc)))
            stream.write_eof()
            return
        session.send_status(stream, StatusReply(Status.OK))
        await Relay(stream, upstream).start()

    # client side
    async def _dial(self, key: PoolKey) -> MuxSession:
        loop = asyncio.get_running_loop()
        _, leg = await loop.create_connection(lambda: TlsLeg(self.client_ctx, False, "mux"), HOST, self.tunnel_port)
        await leg.handshake_done
        return MuxSession(leg, client=True).start()

    def _accept_app(self) -> PlainLeg:
        return PlainLeg(start_paused=True, on_connected=lambda leg: self._spawn(self._serve_app(leg)))

    async def _serve_app(self, app: PlainLeg) -> None:
        session = await self.pool.session(self.key)
        stream, reply = await session.open(ConnectionFacts(HOST, self.backend_port), 5)
        if reply.status is not Status.OK:
            app.reset()
            return
        await Relay(app, stream).start()

    async def stop(self) -> None:
        self.pool.close_all("test over")
        self.tunnel_server.close()
        self.app_server.close()
        for task in list(self.tasks):
            task.cancel()


async def backend(mode: str):
    async def handle(reader, writer):
        digest = hashlib.sha256()
        while chunk := await reader.read(65536):
            digest.update(chunk)
            if mode == "echo":
                writer.write(chunk)
                await writer.drain()
        if mode == "digest":
            writer.write(digest.hexdigest().encode())
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, payload: bytes, start_reading: asyncio.Event | None = None) -> bytes:
    """Send ``payload`` and half-close, read the whole reply (only once ``start_reading`` is set, if given)."""
    reader, writer = await asyncio.open_connection(HOST, port)

    async def send():
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.get_running_loop().create_task(send())
    if start_reading is not None:
        await start_reading.wait()
    reply = await reader.read(-1)
    await sender
    writer.close()
    return reply


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_many_connections_share_one_tunnel_and_arrive_intact(tls_contexts):
    async def body():
        server, port = await backend("echo")
        h = Harness(tls_contexts, port)
        await h.start()
        try:
            payloads = [os.urandom(512 * 1024 + i) for i in range(24)]
            replies = await asyncio.gather(*(exchange(h.app_port, p) for p in payloads))
            assert [hashlib.sha256(r).digest() for r in replies] == [hashlib.sha256(p).digest() for p in payloads]
            assert h.pool.dials == 1 and len(h.server_sessions) == 1
            assert h.server_sessions[0].opened_streams == 24
            await asyncio.sleep(0.05)
            assert h.server_sessions[0].streams == {}  # finished streams are forgotten
        finally:
            await h.stop()
            server.close()

    run(body())


def test_half_close_is_carried_per_stream(tls_contexts):
    async def body():
        server, port = await backend("digest")
        h = Harness(tls_contexts, port)
        await h.start()
        try:
            payload = os.urandom(3 * 1024 * 1024)
            assert await exchange(h.app_port, payload) == hashlib.sha256(payload).hexdigest().encode()
        finally:
            await h.stop()
            server.close()

    run(body())


def test_a_slow_reader_does_not_stall_other_streams(tls_contexts):
    async def body():
        server, port = await backend("echo")
        h = Harness(tls_contexts, port)
        await h.start()
        try:
            big = os.urandom(24 * 1024 * 1024)  # far beyond one stream's window and the socket buffers
            read_now = asyncio.Event()
            slow = asyncio.get_running_loop().create_task(exchange(h.app_port, big, start_reading=read_now))
            # the slow reader's stream runs out of window on the far side (its echo stops), so the stall
            # is held by flow control, per stream, not by buffering
            while not h.server_sessions or not [s for s in h.server_sessions[0].streams.values() if s.send_window <= 0]:
                await asyncio.sleep(0.01)
            (blocked,) = [s for s in h.server_sessions[0].streams.values() if s.send_window <= 0]
            small = os.urandom(100_000)
            assert await exchange(h.app_port, small) == small  # meanwhile another stream carries all of it
            assert blocked.send_window <= 0 and not slow.done(), "the slow stream was not blocked throughout"
            assert h.pool.dials == 1 and h.server_sessions[0].opened_streams == 2  # on the same tunnel
            read_now.set()
            assert hashlib.sha256(await slow).digest() == hashlib.sha256(big).digest()
        finally:
            await h.stop()
            server.close()

    run(body())


def test_refused_streams_and_a_lost_tunnel_reset_their_connections(tls_contexts):
    async def body():
        with socket.socket() as s:
            s.bind((HOST, 0))
            dead_port = s.getsockname()[1]
        h = Harness(tls_contexts, dead_port)
        await h.start()
        try:
            with pytest.raises(ConnectionResetError):  # a reset, not a clean (truncating) FIN
                await exchange(h.app_port, b"x")
            server, port = await backend("echo")
            h.backend_port = port
            reader, writer = await asyncio.open_connection(HOST, h.app_port)
            writer.write(b"ping")
            assert await reader.read(4) == b"ping"
            h.server_sessions[0].tls.reset()  # the tunnel dies under an open stream
            with pytest.raises(ConnectionResetError):  # a reset, not a clean (truncating) FIN
                await reader.read(10)
            writer.close()
            server.close()
        finally:
            await h.stop()

    run(body())


def test_a_tunnel_whose_server_certificate_expired_takes_no_new_streams(tls_contexts):
    async def body():
        server, port = await backend("echo")
        h = Harness(tls_contexts, port)
        await h.start()
        try:
            assert await exchange(h.app_port, b"one") == b"one"
            (first,) = [s for sessions in h.pool._sessions.values() for s in sessions]
            first.peer_valid_until = 0.0  # as if the server's certificate had expired
            assert not first.usable
            assert await exchange(h.app_port, b"two") == b"two"
            assert h.pool.dials == 2, "a new tunnel (new handshake, fresh certificate check) was expected"
        finally:
            await h.stop()
            server.close()

    run(body())
