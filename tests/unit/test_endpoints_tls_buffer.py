"""TlsLeg's receive path: plaintext is decrypted into a reused buffer. Two legs run TLS 1.3 over an
in-memory transport pair, so one ``data_received`` can carry far more than the buffer holds."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess

import pytest

from agent.proxy.endpoints import READ_CHUNK, TlsLeg
from tests.hotpath_impls import hotpath_impl  # noqa: F401 - a fixture: every test runs on both implementations


class MemoryTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closing = self.aborted = False

    def get_extra_info(self, name, default=None):
        return default

    def write(self, data) -> None:
        self.sent.append(bytes(data))

    def take(self) -> bytes:
        out, self.sent = b"".join(self.sent), []
        return out

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Collector:
    def __init__(self, takes_views: bool) -> None:
        if takes_views:
            self.takes_views = True
        self.chunks: list = []
        self.types: set[type] = set()
        self.eof = False

    def leg_data(self, leg, data) -> None:
        self.types.add(type(data))
        self.chunks.append(bytes(data))  # a view receiver copies what it keeps

    def leg_eof(self, leg) -> None:
        self.eof = True

    def leg_closed(self, leg, exc) -> None:
        pass

    def leg_pause_writing(self, leg) -> None:
        pass

    def leg_resume_writing(self, leg) -> None:
        pass


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", d / "k.pem", "-out", d / "c.pem", "-subj", "/CN=leg", "-days", "1"],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(d / "c.pem", d / "k.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


async def connected_pair(contexts):
    server_ctx, client_ctx = contexts
    client, server = TlsLeg(client_ctx, server_side=False), TlsLeg(server_ctx, server_side=True)
    ct, st = MemoryTransport(), MemoryTransport()
    server.connection_made(st)
    client.connection_made(ct)
    for _ in range(10):
        if client.handshake_done.done() and server.handshake_done.done() and not ct.sent and not st.sent:
            break
        if ct.sent:
            server.data_received(ct.take())
        if st.sent:
            client.data_received(st.take())
    await asyncio.wait_for(asyncio.gather(client.handshake_done, server.handshake_done), 5)
    return client, ct, server


@pytest.mark.parametrize("takes_views", [False, True])
def test_many_buffers_of_plaintext_in_one_delivery_arrive_intact(hotpath_impl, contexts, takes_views):
    async def main():
        client, client_transport, server = await connected_pair(contexts)
        receiver = Collector(takes_views)
        server.set_receiver(receiver)
        payload = os.urandom(3 * READ_CHUNK + 12345)
        client.write(payload)
        client.write_eof()
        server.data_received(client_transport.take())  # all records at once: the buffer fills 3 times
        return payload, receiver

    payload, receiver = asyncio.run(main())
    assert b"".join(receiver.chunks) == payload
    assert len(receiver.chunks) >= 4 and all(len(c) <= READ_CHUNK for c in receiver.chunks)
    assert receiver.types == ({memoryview} if takes_views else {bytes})
    assert receiver.eof


def test_plaintext_before_a_receiver_is_kept_as_bytes(hotpath_impl, contexts):
    async def main():
        client, client_transport, server = await connected_pair(contexts)
        server.detach_receiver()
        first, second = os.urandom(1000), os.urandom(2000)
        client.write(first)
        server.data_received(client_transport.take())
        client.write(second)
        server.data_received(client_transport.take())  # reuses the buffer the first delivery used
        receiver = Collector(takes_views=True)
        server.set_receiver(receiver)
        return first + second, receiver

    payload, receiver = asyncio.run(main())
    assert b"".join(receiver.chunks) == payload
