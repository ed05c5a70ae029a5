"""PlainLeg.write with a view of a reused buffer (the zero-copy receive path): what the socket does not
take at once is copied, so reusing the buffer right after the call never corrupts the stream."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent.cli import run_event_loop
from agent.proxy.endpoints import READ_BUFFER, PlainLeg


async def _connected_leg() -> tuple[PlainLeg, socket.socket]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # the kernel takes only part of a write
    theirs.setblocking(False)
    _, leg = await loop.create_connection(PlainLeg, sock=ours)
    return leg, theirs


async def _read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        got += await loop.sock_recv(sock, 1 << 20)
    return bytes(got)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_view_is_delivered_intact_though_its_buffer_is_reused_after_each_write(event_loop):
    chunks = [os.urandom(300_000) for _ in range(6)]

    async def main() -> bytes:
        leg, peer = await _connected_leg()
        buffer = bytearray(300_000)
        view = memoryview(buffer)
        reader = asyncio.ensure_future(_read_all(peer, sum(map(len, chunks))))
        for chunk in chunks:
            buffer[:] = chunk
            leg.write(view)  # partly taken by the kernel; the rest must be a copy
            buffer[:] = b"\xee" * len(buffer)  # the next read into the shared buffer
            await asyncio.sleep(0)
        got = await asyncio.wait_for(reader, 10)
        leg.close()
        peer.close()
        return got

    got = None

    async def run() -> None:
        nonlocal got
        got = await main()

    run_event_loop(run(), event_loop)
    assert got == b"".join(chunks)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_reads_reach_a_receiver_without_views_as_bytes(event_loop):
    class Receiver:
        def __init__(self) -> None:
            self.chunks: list = []
            self.eof = asyncio.Event()

        def leg_data(self, leg, data) -> None:
            self.chunks.append(data)

        def leg_eof(self, leg) -> None:
            self.eof.set()

        def leg_closed(self, leg, exc) -> None:
            pass

        def leg_pause_writing(self, leg) -> None:
            pass

        def leg_resume_writing(self, leg) -> None:
            pass

    payload = os.urandom(3 * READ_BUFFER + 5)
    types: set[type] = set()
    received = b""

    async def main() -> None:
        nonlocal received
        leg, peer = await _connected_leg()
        receiver = Receiver()
        leg.set_receiver(receiver)
        await asyncio.get_running_loop().sock_sendall(peer, payload)
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(receiver.eof.wait(), 10)
        types.update(type(c) for c in receiver.chunks)
        received = b"".join(receiver.chunks)
        leg.close()
        peer.close()

    run_event_loop(main(), event_loop)
    assert types == {bytes} and received == payload
