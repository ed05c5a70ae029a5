"""Attack: a stolen SVID keeps working on a tunnel opened while it was valid (issue #15 item 1).

TLS checks a certificate once, at the handshake. The source side stops using a tunnel before the
server's certificate expires, but the inbound side kept accepting new streams on a tunnel whose
*client* certificate had expired, or whose chain led to a root that was then removed from the trust
bundle: whoever stole an SVID and its key could hold one tunnel open and use it forever. Now the
inbound side checks the tunnel's credential at every OPEN (refused: STATUS DENIED, flag
IDENTITY_ERROR, naming why) and closes such a tunnel when its last stream ends — streams already open
get at most ``proxy.revoked_tunnel_grace_seconds``.

Both nodes' proxies run in one process with real TLS sockets on loopback (the world of
tests/integration/test_reliability_hostile.py); the attacker is a hand-made tcpmesh/2 client with
a short-lived SVID of a real workload.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from agent.identity.ca import init_ca, load_ca
from agent.identity.store import IdentityStore
from agent.identity.svid import DEV_MIN_TTL_SECONDS
from agent.proxy import mux as M
from agent.connection.facts import ConnectionFacts
from agent.proxy.header import Status, decode_status_body, encode_connect_body
from tests.integration.test_proxy_loopback import TD
from tests.integration.test_reliability_hostile import SERVER_IP, World, flows_with, run_world, tls

SVID_SECONDS = 3


class Tunnel:
    """A raw tcpmesh/2 client on one TLS connection: OPEN streams, read their STATUS, see GOAWAY."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = M.FrameDecoder()
        self.frames: list[M.Frame] = []
        self.next_id = 1

    async def open(self, port: int) -> tuple[int, Status, str]:
        stream = self.next_id
        self.next_id += 2
        self.writer.write(M.encode(M.FrameType.OPEN, stream, encode_connect_body(ConnectionFacts(SERVER_IP, port))))
        while True:
            for frame in self.frames:
                if frame.type is M.FrameType.STATUS and frame.stream == stream:
                    reply = decode_status_body(frame.payload)
                    return stream, reply.status, reply.reason
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, f"the tunnel closed before answering stream {stream}: {[f.type for f in self.frames]}"
            self.frames += self.decoder.feed(data)

    def finish(self, stream: int) -> None:
        self.writer.write(M.encode(M.FrameType.FIN, stream))

    async def closed_within(self, seconds: float) -> bool:
        try:
            while data := await asyncio.wait_for(self.reader.read(65536), seconds):
                self.frames += self.decoder.feed(data)
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            pass
        return True


def short_lived_context(world: World, ca=None) -> ssl.SSLContext:
    store = IdentityStore(ca or world.mesh.ca, (ca or world.mesh.ca).cert_pem, SVID_SECONDS,
                          min_ttl_seconds=DEV_MIN_TTL_SECONDS)
    store.ensure([world.web])
    return store.client_context_for(world.web)


def test_a_tunnel_whose_client_certificate_expired_opens_no_more_streams_and_closes(tmp_path):
    async def body(world: World) -> None:
        tunnel = Tunnel(*await tls(world, short_lived_context(world)))
        first, status, _ = await tunnel.open(world.echo_port)
        assert status is Status.OK
        await asyncio.sleep(SVID_SECONDS + 1.5)  # the client certificate has expired; the tunnel is open
        _, status, reason = await tunnel.open(world.echo_port)
        # before the fix: OK — a stolen, expired SVID kept opening streams
        assert status is Status.DENIED and "expired" in reason, (status, reason)
        (refused,) = await flows_with(world.dst, "IDENTITY_ERROR")
        assert "expired" in refused["detail"] and refused["source_principal"] == world.web.uri
        assert M.FrameType.GOAWAY in [f.type for f in tunnel.frames] or not await tunnel.closed_within(0.5)
        tunnel.finish(first)  # the last stream ends: the tunnel goes
        assert await tunnel.closed_within(5), "the tunnel stayed open after its last stream ended"
        tunnel.writer.close()

    run_world(tmp_path, body)


def test_a_tunnel_chaining_to_a_root_removed_from_the_bundle_is_refused_and_closed(tmp_path):
    async def body(world: World) -> None:
        tunnel = Tunnel(*await tls(world, world.client_store().client_context_for(world.web)))
        _, status, _ = await tunnel.open(world.echo_port)
        assert status is Status.OK
        stream, _, _ = await tunnel.open(world.echo_port)
        # the operator removes the root (a compromise, or the last step of a rotation): node 2 trusts only a new one
        init_ca(TD, tmp_path / "new-root")
        new_root = load_ca(tmp_path / "new-root")
        world.dst.identities.replace_ca(new_root, new_root.cert_pem)
        started = time.monotonic()
        _, status, reason = await tunnel.open(world.echo_port)
        # before the fix: OK — the tunnel outlived the root it was verified against
        assert status is Status.DENIED and "bundle" in reason, (status, reason)
        for stream_id in (1, stream):
            tunnel.finish(stream_id)
        assert await tunnel.closed_within(5), "the tunnel stayed open after its last stream ended"
        assert time.monotonic() - started < 5
        tunnel.writer.close()

    run_world(tmp_path, body)


def test_streams_open_when_the_credential_stops_holding_get_a_bounded_grace(tmp_path):
    def configure(world: World) -> None:
        world.dst.revoked_grace = 1.0

    async def body(world: World) -> None:
        tunnel = Tunnel(*await tls(world, short_lived_context(world)))
        _, status, _ = await tunnel.open(world.echo_port)
        assert status is Status.OK
        # the stream is held open past the expiry (an attacker's, or a long transfer): it may finish within
        # the grace, then the tunnel is closed and the stream reset
        assert await tunnel.closed_within(SVID_SECONDS + 1.0 + 4), "the grace did not end the tunnel"
        assert M.FrameType.GOAWAY in [f.type for f in tunnel.frames]
        tunnel.writer.close()

    run_world(tmp_path, body, configure=configure)
