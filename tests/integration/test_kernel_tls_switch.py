"""The switch to kernel TLS (agent.proxy.kernel_leg) on loopback, on any kernel: this host has no CONFIG_TLS, so the
kernel's part (``install``) is replaced by a recorder, and the test does the kernel's work itself with the keys the
switch handed over — it opens the records that follow the handshake with the RX keys and seals records with the TX
keys, at sequence number 0. What that proves, for both ends and both event loops: the secrets found in the key log
belong to the connection, the keys and IVs are derived right, nothing after the peer's last handshake record was
read into user space (a record sent right behind the Finished is still in the socket), and the other end — today's
user-space TLS — reads what the kernel would seal. The kernel itself: tests/vm/guest_kernel_tls.py in the VM tier.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.cli import run_event_loop
from agent.proxy import kernel_leg
from agent.proxy import tls_records as R
from agent.proxy.endpoints import TlsLeg
from agent.proxy.kernel_leg import KernelTls, KernelTlsLeg
from agent.proxy.kernel_tls import KernelTlsError, KeyLog
from agent.proxy.kernel_tls_probe import probe_contexts
from agent.proxy.mux import HEADER_SIZE as M_HEADER
from tests.hotpath_impls import hotpath_impl  # noqa: F401 - a fixture: both implementations of the relay steps

TIMEOUT = 10.0


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()
        self.reads = 0
        self.ended = None

    def leg_data(self, leg, data) -> None:
        self.data += data
        self.reads += 1

    def leg_eof(self, leg) -> None:
        self.ended = "eof"

    def leg_closed(self, leg, exc) -> None:
        self.ended = self.ended or f"closed: {exc}"

    def leg_pause_writing(self, leg) -> None:
        pass

    def leg_resume_writing(self, leg) -> None:
        pass


class EagerClient(TlsLeg):
    """A user-space client that sends its first application record in the same write as its Finished."""

    def _handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        self.ssl_object.write(b"right behind the Finished")
        self._flush()
        self.handshake_done.set_result(None)


def aead(info: bytes):
    """(AEAD, 12-byte IV, sequence) from a tls12_crypto_info_aes_gcm_* the switch installed."""
    version, cipher = struct.unpack("=HH", info[:4])
    assert version == R.TLS_1_3_VERSION
    key_size = {51: 16, 52: 32}[cipher]
    explicit, key = info[4:12], info[12:12 + key_size]
    salt, seq = info[12 + key_size:16 + key_size], info[16 + key_size:]
    return AESGCM(key), salt + explicit, int.from_bytes(seq, "big")


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big")))


def open_records(stream: bytes, info: bytes) -> list[bytes]:
    """What the kernel's TLS_RX would deliver: each record opened, in order from sequence number 0."""
    cipher, iv, seq = aead(info)
    out = []
    while stream:
        assert stream[:3] == bytes([23, 3, 3]), f"not a TLS 1.3 record at a boundary: {stream[:5].hex()}"
        size = int.from_bytes(stream[3:5], "big")
        inner = cipher.decrypt(nonce(iv, seq), stream[5:5 + size], stream[:5]).rstrip(b"\0")
        assert inner[-1] == 23, "not application data"
        out.append(inner[:-1])
        stream, seq = stream[5 + size:], seq + 1
    return out


def seal_record(info: bytes, data: bytes, seq: int = 0) -> bytes:
    """What the kernel's TLS_TX would send for ``data``."""
    cipher, iv, first = aead(info)
    header = bytes([23, 3, 3]) + struct.pack("!H", len(data) + 1 + 16)
    return header + cipher.encrypt(nonce(iv, first + seq), data + bytes([23]), header)


@pytest.fixture
def installed(monkeypatch):
    """Stands in for the kernel: records (fd, tx, rx) of each switch."""
    calls: list[tuple[int, bytes, bytes]] = []
    monkeypatch.setattr(kernel_leg, "install", lambda fd, tx, rx: calls.append((fd, tx, rx)))
    return calls


async def pair(client_factory, server_factory):
    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    def server_leg():
        leg = server_factory()
        accepted.set_result(leg)
        return leg

    server = await loop.create_server(server_leg, "127.0.0.1", 0)
    _, client = await loop.create_connection(client_factory, "127.0.0.1", server.sockets[0].getsockname()[1])
    return server, client, await asyncio.wait_for(accepted, TIMEOUT)


async def until(check, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_client_switches_and_a_user_space_server_reads_what_its_keys_seal(installed, event_loop):
    client_ctx, server_ctx, sni = probe_contexts()
    kernel = KernelTls("on", KeyLog(), "test")

    async def main():
        server, client, peer = await pair(lambda: kernel.leg(client_ctx, False, sni), lambda: TlsLeg(server_ctx, True))
        try:
            await asyncio.wait_for(asyncio.gather(client.handshake_done, peer.handshake_done), TIMEOUT)
            assert isinstance(client, KernelTlsLeg) and client.alpn == "tcpmesh/2"
            ((fd, tx, rx),) = installed
            assert fd == client.transport.get_extra_info("socket").fileno()
            assert len(tx) == len(rx) == 56 and tx != rx  # AES-256-GCM, what the tunnels negotiate
            got_client, got_server = Collect(), Collect()
            client.set_receiver(got_client)
            peer.set_receiver(got_server)
            peer.write(b"from the user-space server")  # its first application record: sequence 0
            await until(lambda: len(got_client.data) >= 5 + 26 + 17, "the server's record")
            assert open_records(bytes(got_client.data), rx) == [b"from the user-space server"]
            # read whole by the kernel leg's own buffer: uvloop keeps the bound methods it found at connection_made,
            # so the switch sets the protocol again (seen failing without: the handshake's record-sized reads went
            # on, header and body apart, and with its buffer freed the transport died in get_buffer)
            assert got_client.reads == 1
            client.transport.write(seal_record(tx, b"sealed as the kernel would"))
            await until(lambda: got_server.data, "the client's record")
            assert bytes(got_server.data) == b"sealed as the kernel would"
        finally:
            client.close()
            peer.close()
            server.close()

    run_event_loop(asyncio.wait_for(main(), 3 * TIMEOUT), event_loop)
    kernel.keylog.close()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_server_switches_before_reading_the_record_right_behind_the_clients_finished(installed, event_loop):
    """Seen failing with ``get_buffer`` not cut at the record's end: the switch refused ("bytes after the
    handshake's last record were read into user space")."""
    client_ctx, server_ctx, sni = probe_contexts()
    kernel = KernelTls("on", KeyLog(), "test")

    async def main():
        server, client, peer = await pair(lambda: EagerClient(client_ctx, False, sni),
                                          lambda: kernel.leg(server_ctx, True))
        try:
            await asyncio.wait_for(asyncio.gather(client.handshake_done, peer.handshake_done), TIMEOUT)
            assert isinstance(peer, KernelTlsLeg)
            ((_, tx, rx),) = installed
            got = Collect()
            peer.set_receiver(got)  # what the kernel's TLS_RX would have opened: the record, whole, from sequence 0
            await until(lambda: len(got.data) >= 5 + 25 + 17, "the client's first record")
            assert open_records(bytes(got.data), rx) == [b"right behind the Finished"]
            back = Collect()
            client.set_receiver(back)
            peer.transport.write(seal_record(tx, b"answer"))
            await until(lambda: back.data, "the server's record")
            assert bytes(back.data) == b"answer"
        finally:
            client.close()
            peer.close()
            server.close()

    run_event_loop(asyncio.wait_for(main(), 3 * TIMEOUT), event_loop)
    kernel.keylog.close()


def test_a_switch_the_kernel_refuses_closes_the_tunnel_and_auto_falls_back_for_good(monkeypatch, caplog):
    def refuse(fd, tx, rx):
        raise OSError(errno.ENOPROTOOPT, "setsockopt(TLS_RX): Protocol not available")

    monkeypatch.setattr(kernel_leg, "install", refuse)
    client_ctx, server_ctx, sni = probe_contexts()
    kernel = KernelTls("auto", KeyLog(), "test")

    async def main():
        server, client, peer = await pair(lambda: kernel.leg(client_ctx, False, sni), lambda: TlsLeg(server_ctx, True))
        try:
            with pytest.raises(KernelTlsError, match="the kernel refused the keys"):
                await asyncio.wait_for(client.handshake_done, TIMEOUT)
            await until(lambda: client.lost, "the tunnel closed")  # fail closed: never continued in user space
            assert not isinstance(client, KernelTlsLeg)
            assert kernel.leg(client_ctx, False, sni).__class__ is TlsLeg  # every later tunnel: user space
        finally:
            client.close()
            peer.close()
            server.close()

    run_event_loop(asyncio.wait_for(main(), 3 * TIMEOUT), "asyncio")
    assert not kernel.active and kernel.switch_failures == 1
    assert "user-space TLS from now on" in kernel.reason and "Protocol not available" in kernel.reason
    assert client_ctx.keylog_filename is None  # no context logs secrets any more
    assert any("switching the tunnel" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    kernel.keylog.close()


def test_the_key_log_is_an_anonymous_memory_file_read_and_emptied_per_connection(installed):
    client_ctx, server_ctx, sni = probe_contexts()
    keylog = KeyLog()
    kernel = KernelTls("on", keylog, "test")
    assert os.readlink(keylog.path).startswith("/memfd:tcpmesh-tls-keylog")  # never a file on disk

    async def main():
        server, client, peer = await pair(lambda: kernel.leg(client_ctx, False, sni),
                                          lambda: kernel.leg(server_ctx, True))
        try:
            await asyncio.wait_for(asyncio.gather(client.handshake_done, peer.handshake_done), TIMEOUT)
        finally:
            client.close()
            peer.close()
            server.close()

    run_event_loop(asyncio.wait_for(main(), 3 * TIMEOUT), "asyncio")
    (_, first_tx, first_rx), (_, second_tx, second_rx) = installed
    assert first_tx == second_rx and first_rx == second_tx  # each end's TX keys are the other's RX keys
    assert os.fstat(int(keylog.path.rsplit("/", 1)[1])).st_size == 0  # consumed and truncated
    assert keylog._secrets == {} and len(keylog._recent) <= 1  # the taken secrets of the last connection only
    keylog.close()


async def echo(reader, writer):
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def mesh_with_kernel_legs(tmp_path, body, backend=echo):
    """Both nodes' proxies (tests/integration/test_proxy_loopback.py's Mesh) with every tunnel on a kernel TLS leg."""
    from agent.proxy.inbound import InboundProxy
    from agent.proxy.outbound import OutboundProxy
    from tests.integration.test_proxy_loopback import NODE1, NODE2, SERVER_IP, Mesh, free_port

    loop = asyncio.get_running_loop()
    inbound_port, backend_port = free_port(NODE2), free_port(SERVER_IP)
    mesh = Mesh(tmp_path, inbound_port, {"ip": SERVER_IP, "port": backend_port})
    kernels = []
    for node in ("node1", "node2"):
        ctx = mesh.context(node, loop)
        ctx.kernel_tls = KernelTls("on", KeyLog(), "test")
        ctx.identities.set_context_hook(ctx.kernel_tls.adopt)
        kernels.append(ctx.kernel_tls)
    outbound = OutboundProxy(mesh.contexts["node1"], mesh.read_origin)
    inbound = InboundProxy(mesh.contexts["node2"])
    servers = [await asyncio.start_server(backend, SERVER_IP, backend_port),
               await loop.create_server(outbound.protocol_factory, NODE1, 0),
               await loop.create_server(inbound.protocol_factory, NODE2, inbound_port)]
    mesh.outbound_address = servers[1].sockets[0].getsockname()[:2]
    try:
        await body(mesh, outbound)
    finally:
        for server in servers:
            server.close()
        for ctx in mesh.contexts.values():
            await ctx.drain(0.5)
        outbound.pool.close_all("test over")
        for kernel in kernels:
            kernel.keylog.close()


async def open_client(mesh):
    from tests.integration.test_proxy_loopback import CLIENT_IP

    sock = socket.socket()
    sock.bind((CLIENT_IP, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, mesh.outbound_address)
    return await asyncio.open_connection(sock=sock)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_kernel_legs_carry_small_and_large_messages_through_both_implementations_of_the_relay_steps(
        installed, hotpath_impl, tmp_path, event_loop, monkeypatch):
    """Every tunnel on a kernel TLS leg, the kernel's part left out (nothing installed: the tunnel carries frames in
    plaintext, which is what the kernel hands the leg): small messages take the compiled relay steps (relay_send
    and receive without an SSL object: KernelTlsLeg.write_data_frame is never called, the reads are routed) or
    their Python reference, a large one and a half-close cross intact, and the key's use is counted either way.
    Seen failing before relay_send and receive took a kernel leg (every message went the Python way: 64 Python
    calls per round trip in bench.hop_cpu, 16 now)."""
    python_frames = []
    original = KernelTlsLeg.write_data_frame

    def counted(self, stream, data):
        python_frames.append(len(data))
        original(self, stream, data)
    monkeypatch.setattr(KernelTlsLeg, "write_data_frame", counted)

    async def body(mesh, outbound):
        reader, writer = await open_client(mesh)
        for i in range(50):
            message = f"ping {i}".encode()
            writer.write(message)
            assert await asyncio.wait_for(reader.readexactly(len(message)), TIMEOUT) == message
        large = os.urandom(3 * 1024 * 1024 + 5)
        writer.write(large)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == large
        writer.close()
        (session,) = [s for sessions in outbound.pool._sessions.values() for s in sessions]
        assert isinstance(session.tls, KernelTlsLeg)
        assert session.tls._blocks >= 50 * R.gcm_blocks(M_HEADER + 6) + R.gcm_blocks(len(large))
        small = [n for n in python_frames if n < 16]
        if hotpath_impl == "compiled":  # (a message that came before the relay was set up is replayed by Python)
            assert len(small) <= 2 and session.tls._frames is session, small
        else:
            assert len(small) >= 100 and session.tls._frames is None  # both directions, both nodes

    run_event_loop(asyncio.wait_for(mesh_with_kernel_legs(tmp_path, body), 6 * TIMEOUT), event_loop)


def test_a_kernel_tls_tunnel_retires_before_the_aes_gcm_limit_and_closes_at_it(installed, hotpath_impl, tmp_path):
    """RFC 8446 §5.5 without rekeying: past RETIRE_BLOCKS the client's pool takes no new stream on the tunnel (a
    second connection gets a new tunnel), past CLOSE_BLOCKS the tunnel is closed."""

    async def body(mesh, outbound):
        reader, writer = await open_client(mesh)
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), TIMEOUT) == b"one"
        (first,) = [s for sessions in outbound.pool._sessions.values() for s in sessions]
        first.tls._blocks = R.RETIRE_BLOCKS - 1
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), TIMEOUT) == b"two"
        assert not first.usable and not first.closed.done()  # retired: open streams go on
        other_reader, other_writer = await open_client(mesh)
        other_writer.write(b"three")
        assert await asyncio.wait_for(other_reader.readexactly(5), TIMEOUT) == b"three"
        assert outbound.pool.dials == 2
        first.tls._blocks = R.CLOSE_BLOCKS - 1
        writer.write(b"four")
        await asyncio.wait_for(asyncio.shield(first.closed), TIMEOUT)
        assert first.closed.result() == "kernel TLS key usage limit"
        for w in (writer, other_writer):
            w.close()

    run_event_loop(asyncio.wait_for(mesh_with_kernel_legs(tmp_path, body), 6 * TIMEOUT), "uvloop")


def test_a_kernel_leg_never_queues_a_view_of_a_reused_buffer_when_its_socket_is_full(installed, tmp_path):
    """A backend that reads nothing for a while: the tunnel's socket fills, so the transport queues what the kernel
    leg writes — which must then be a copy, not a view of the thread's read buffer that the next read overwrites.
    Seen failing in the two-VM test (4 MiB echoed with the right length and the wrong SHA-256) and here before the
    fix (KernelTlsLeg.write_parts handed uvloop a memoryview of the read buffer)."""

    async def slow_then_echo(reader, writer):
        await asyncio.sleep(1.0)  # let the tunnel's socket fill up
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def body(mesh, outbound):
        reader, writer = await open_client(mesh)
        payload = os.urandom(12 * 1024 * 1024 + 11)

        async def send():
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
        sending = asyncio.ensure_future(send())
        echoed = await asyncio.wait_for(reader.read(), 6 * TIMEOUT)
        await sending
        writer.close()
        assert len(echoed) == len(payload)
        assert echoed == payload, "the echo came back with the right length and other bytes"

    run_event_loop(asyncio.wait_for(mesh_with_kernel_legs(tmp_path, body, slow_then_echo), 8 * TIMEOUT), "uvloop")
