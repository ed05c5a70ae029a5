"""Kernel TLS in the tunnels, for real: run in a VM tier guest whose kernel has kernel TLS (Debian 12's 6.1, 13's
6.12), by tests/vm/test_kernel_matrix.py (`python -m pytest tests/vm/guest_kernel_tls.py` in the guest; not
collected on the host, whose kernel has no CONFIG_TLS: the name does not start with ``test_``).

- Both nodes' proxies in one process on loopback (tests/integration/test_proxy_loopback.py's ``Mesh``), each
  node's tunnels on kernel or user-space TLS independently — kernel/kernel, kernel/user, user/kernel: 4 MiB and a
  half-close cross intact (the backend reads nothing for a second, so the tunnel's socket fills and what the legs
  write is queued; it answers the SHA-256 after the client's FIN), the tunnels really are kernel
  TLS (the legs switched, /proc/net/tls_stat's TlsTxSw and TlsRxSw rise by one per kernel end), and the agent's
  own count says so (KernelTls.describe, what `tcpmesh status` shows);
- close_notify both ways between a kernel end and a user-space end: each reads it as the tunnel's end;
- a record changed on the wire after the switch (a relay flips one bit) makes the kernel end lose the tunnel
  with EBADMSG and deliver nothing of it (fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from agent.cli import run_event_loop
from agent.proxy.endpoints import TlsLeg
from agent.proxy.inbound import InboundProxy
from agent.proxy.kernel_leg import KernelTls, KernelTlsLeg
from agent.proxy.kernel_tls import KeyLog
from agent.proxy.kernel_tls_probe import probe_contexts, ulp_problem
from agent.proxy.outbound import OutboundProxy
from tests.integration.test_proxy_loopback import NODE1, NODE2, SERVER_IP, Mesh, client_exchange, free_port

TIMEOUT = 120.0  # software emulation
PAYLOAD = 4 * 1024 * 1024 + 3  # several MB; emulated AES runs at 10-30 Mbit/s


def tls_stat() -> dict[str, int]:
    with open("/proc/net/tls_stat") as f:
        return {name: int(value) for name, value in (line.split() for line in f if line.strip())}


@pytest.fixture(autouse=True, scope="module")
def kernel_has_tls():
    problem = ulp_problem()
    assert problem is None, f"this guest's kernel should run kernel TLS: {problem}"


def node_tls(kind: str) -> KernelTls:
    return KernelTls("on", KeyLog(), "guest test") if kind == "kernel" else KernelTls.off()


@pytest.mark.parametrize("sides,event_loop", [("kernel-kernel", "uvloop"), ("kernel-user", "uvloop"),
                                              ("user-kernel", "uvloop"), ("kernel-kernel", "asyncio")])
def test_bytes_and_half_close_cross_kernel_tls_tunnels_in_every_mix(tmp_path, sides, event_loop):
    client_side, server_side = sides.split("-")
    payload = os.urandom(PAYLOAD)
    before = tls_stat()
    tls = {"node1": node_tls(client_side), "node2": node_tls(server_side)}

    async def backend(reader, writer):
        await asyncio.sleep(1.0)  # reads nothing at first: the tunnel's socket fills and the transports queue writes
        digest, size = hashlib.sha256(), 0
        while chunk := await reader.read(65536):
            digest.update(chunk)
            size += len(chunk)
        writer.write(f"{size} {digest.hexdigest()}".encode())  # after the client's half-close
        await writer.drain()
        writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        inbound_port, backend_port = free_port(NODE2), free_port(SERVER_IP)
        mesh = Mesh(tmp_path, inbound_port, {"ip": SERVER_IP, "port": backend_port})
        for node in ("node1", "node2"):
            ctx = mesh.context(node, loop)
            ctx.kernel_tls = tls[node]
            ctx.identities.set_context_hook(tls[node].adopt if tls[node].active else None)
        outbound = OutboundProxy(mesh.contexts["node1"], mesh.read_origin)
        mesh.outbound = outbound
        inbound = InboundProxy(mesh.contexts["node2"])
        servers = [await asyncio.start_server(backend, SERVER_IP, backend_port),
                   await loop.create_server(outbound.protocol_factory, NODE1, 0),
                   await loop.create_server(inbound.protocol_factory, NODE2, inbound_port)]
        mesh.outbound_address = servers[1].sockets[0].getsockname()[:2]
        try:
            reply = await asyncio.wait_for(client_exchange(mesh, payload), TIMEOUT)
            assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
            (session,) = [s for sessions in outbound.pool._sessions.values() for s in sessions]
            assert isinstance(session.tls, KernelTlsLeg) == (client_side == "kernel")
        finally:
            for server in servers:
                server.close()
            for ctx in mesh.contexts.values():
                await ctx.drain(0.5)
            outbound.pool.close_all("test over")

    run_event_loop(asyncio.wait_for(main(), 2 * TIMEOUT), event_loop)
    kernel_ends = [client_side, server_side].count("kernel")
    after = tls_stat()
    for counter in ("TlsTxSw", "TlsRxSw"):  # one per kernel end: the tunnels really were kernel TLS
        assert after[counter] - before[counter] == kernel_ends, (counter, before, after)
    for node, side in (("node1", client_side), ("node2", server_side)):
        established = tls[node].describe()["established"]
        assert established == ({"kernel": 1, "user": 0} if side == "kernel" else {"kernel": 0, "user": 1}), (node, established)
        if tls[node].keylog is not None:
            tls[node].keylog.close()


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def leg_data(self, leg, data) -> None:
        self.data += data

    def leg_eof(self, leg) -> None:
        if not self.ended.done():
            self.ended.set_result("eof")

    def leg_closed(self, leg, exc) -> None:
        if not self.ended.done():
            self.ended.set_result(exc if exc is not None else "closed")

    def leg_pause_writing(self, leg) -> None:
        pass

    def leg_resume_writing(self, leg) -> None:
        pass


async def same_port(port: int) -> int:
    return port


async def pair(client_factory, server_factory, port_of=same_port):
    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    def server_leg():
        leg = server_factory()
        accepted.set_result(leg)
        return leg

    server = await loop.create_server(server_leg, "127.0.0.1", 0)
    port = await port_of(server.sockets[0].getsockname()[1])
    _, client = await loop.create_connection(client_factory, "127.0.0.1", port)
    peer = await asyncio.wait_for(accepted, TIMEOUT)
    await asyncio.wait_for(asyncio.gather(client.handshake_done, peer.handshake_done), TIMEOUT)
    return server, client, peer


@pytest.mark.parametrize("kernel_end", ["client", "server"])
@pytest.mark.parametrize("closing", ["client", "server"])
def test_close_notify_ends_the_tunnel_between_a_kernel_end_and_a_user_space_end(kernel_end, closing):
    client_ctx, server_ctx, sni = probe_contexts()
    kernel = KernelTls("on", KeyLog(), "guest test")

    async def main():
        client_factory = (lambda: kernel.leg(client_ctx, False, sni)) if kernel_end == "client" \
            else (lambda: TlsLeg(client_ctx, False, sni))
        server_factory = (lambda: kernel.leg(server_ctx, True)) if kernel_end == "server" \
            else (lambda: TlsLeg(server_ctx, True))
        server, client, peer = await pair(client_factory, server_factory)
        try:
            assert isinstance(client if kernel_end == "client" else peer, KernelTlsLeg)
            legs = {"client": client, "server": peer}
            reader = legs["server" if closing == "client" else "client"]
            got = Collect()
            reader.set_receiver(got)
            legs[closing].write(b"last words")
            legs[closing].write_eof()  # close_notify: an alert record from the kernel, or OpenSSL's
            assert await asyncio.wait_for(got.ended, TIMEOUT) == "eof"
            assert bytes(got.data) == b"last words"
        finally:
            client.close()
            peer.close()
            server.close()

    run_event_loop(asyncio.wait_for(main(), 2 * TIMEOUT), "uvloop")
    kernel.keylog.close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_a_record_changed_on_the_wire_loses_the_tunnel_and_delivers_nothing(event_loop):
    """A relay between a user-space client and a kernel server flips one bit of the first record after the switch:
    the kernel refuses it (EBADMSG), the leg loses the tunnel and hands over no byte of it."""
    client_ctx, server_ctx, sni = probe_contexts()
    kernel = KernelTls("on", KeyLog(), "guest test")

    async def main():
        tamper = asyncio.Event()

        async def relay(reader, writer, upstream_port):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

            async def pump(src, dst, flip):
                while chunk := await src.read(65536):
                    if flip and tamper.is_set():
                        chunk = bytearray(chunk)
                        chunk[-1] ^= 0x01  # the record's tag
                        chunk = bytes(chunk)
                        tamper.clear()
                    dst.write(chunk)
                    await dst.drain()
                dst.close()
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True)

        relays = []

        async def through_relay(port):
            relay_server = await asyncio.start_server(lambda r, w: relay(r, w, port), "127.0.0.1", 0)
            relays.append(relay_server)
            return relay_server.sockets[0].getsockname()[1]

        server, client, peer = await pair(lambda: TlsLeg(client_ctx, False, sni), lambda: kernel.leg(server_ctx, True),
                                          port_of=through_relay)
        try:
            assert isinstance(peer, KernelTlsLeg)
            got = Collect()
            peer.set_receiver(got)
            tamper.set()
            client.write(b"never to be delivered")
            outcome = await asyncio.wait_for(got.ended, TIMEOUT)
            assert isinstance(outcome, OSError) and outcome.errno == 74, outcome  # EBADMSG
            assert bytes(got.data) == b""
        finally:
            client.close()
            peer.close()
            server.close()
            for relay_server in relays:
                relay_server.close()

    run_event_loop(asyncio.wait_for(main(), 2 * TIMEOUT), event_loop)
    kernel.keylog.close()

