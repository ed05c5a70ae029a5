"""TlsLeg's receive path: plaintext is decrypted into a reused buffer. Two legs run TLS 1.3 over an
in-memory transport pair, so one ``data_received`` can carry far more than the buffer holds."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent.proxy.endpoints import READ_CHUNK
from bench.tls_pair import connected_pair, tls_contexts
from tests.hotpath_impls import hotpath_impl  # noqa: F401 - a fixture: every test runs on both implementations


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
    return tls_contexts(tmp_path_factory.mktemp("tls"), "leg")


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
