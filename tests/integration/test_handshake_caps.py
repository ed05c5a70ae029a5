"""The inbound side's caps on unauthenticated TLS handshakes (agent.proxy.limits.handshake_limits), in
process on loopback: beyond the per-source cap a connection is reset at accept, counted, and leaves no
flow record; another source (a real node) still opens tunnels; the global cap holds across sources; a
finished or failed handshake gives its place back."""

from __future__ import annotations

import asyncio
import time

from agent.proxy.limits import handshake_limits
from tests.integration.test_proxy_loopback import NODE2
from tests.integration.test_reliability_hostile import World, legit_exchange, run_world

ATTACKERS = ("127.0.0.21", "127.0.0.22")


def refused(world: World, limit: str) -> float:
    return world.dst.metrics.registry.get_sample_value("tcpmesh_inbound_handshakes_refused_total",
                                                       {"limit": limit}) or 0.0


def caps(total: int, per_source: int):
    def configure(world: World) -> None:
        world.dst.handshakes = handshake_limits(
            total, per_source, lambda reporter, limit: world.dst.metrics.handshakes_refused.labels(limit).inc())
    return configure


async def idle_connection(source: str, port: int):
    reader, writer = await asyncio.open_connection(NODE2, port, local_addr=(source, 0))
    return reader, writer


async def reset_at_once(reader: asyncio.StreamReader, within: float = 0.3) -> bool:
    """Closed within ``within`` s (the handshake deadline of this world is 0.6 s)."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


def test_beyond_the_per_source_cap_connections_are_reset_at_accept_and_a_node_still_connects(tmp_path):
    async def body(world: World) -> None:
        port = world.mesh.inbound_port
        held = [await idle_connection(ATTACKERS[0], port) for _ in range(3)]
        extra = [await idle_connection(ATTACKERS[0], port) for _ in range(4)]
        assert all([await reset_at_once(reader) for reader, _ in extra])
        assert not await reset_at_once(held[0][0])  # the first three wait in their handshake
        assert refused(world, "per_source") == 4 and world.dst.handshakes.active == 3
        await legit_exchange(world)  # node1 (another source) opens its tunnel meanwhile
        records = [f for f in world.dst.flows.snapshot() if f["source_ip"] == ATTACKERS[0]]
        assert records == [], "a refused connection leaves no flow record"
        for _, writer in held + extra:
            writer.close()
        deadline = time.monotonic() + 3
        while world.dst.handshakes.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert world.dst.handshakes.active == 0 and world.dst.handshakes.identities == 0

    run_world(tmp_path, body, configure=caps(0, 3))


def test_the_global_cap_holds_across_sources(tmp_path):
    async def body(world: World) -> None:
        port = world.mesh.inbound_port
        held = [await idle_connection(ATTACKERS[i % 2], port) for i in range(4)]
        extra = await idle_connection(ATTACKERS[1], port)
        assert await reset_at_once(extra[0])
        assert refused(world, "total") == 1 and refused(world, "per_source") == 0
        for _, writer in held:
            writer.close()
        deadline = time.monotonic() + 3
        while world.dst.handshakes.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await legit_exchange(world)
        assert world.dst.handshakes.active == 0

    run_world(tmp_path, body, configure=caps(4, 3))
