"""Awaiting one tunnel header on a leg: a receiver that feeds a ``HeaderReader`` and resolves a future.

Once the message is complete, reading pauses and the bytes that followed it are handed back, so the
relay can take the leg over without losing a byte.
"""

from __future__ import annotations

import asyncio

from agent.proxy.endpoints import Leg
from agent.proxy.header import ConnectRequest, HeaderReader, PeerProtocolError, StatusReply


class HeaderWaiter:
    def __init__(self, leg: Leg, kind: int) -> None:
        self._leg = leg
        self._reader = HeaderReader(kind)
        self.result: asyncio.Future[tuple[ConnectRequest | StatusReply, bytes]] = (
            asyncio.get_running_loop().create_future())

    def leg_data(self, leg: Leg, data: bytes) -> None:
        if self.result.done():
            return
        try:
            message, rest = self._reader.feed(data)
        except PeerProtocolError as exc:
            self.result.set_exception(exc)
            return
        if message is not None:
            leg.pause_reading()
            leg.detach_receiver()  # later events wait in the leg for the relay
            self.result.set_result((message, rest))

    def leg_eof(self, leg: Leg) -> None:
        if not self.result.done():
            self.result.set_exception(ConnectionResetError("peer closed the tunnel before sending its header"))

    def leg_closed(self, leg: Leg, exc: BaseException | None) -> None:
        if not self.result.done():
            self.result.set_exception(exc or ConnectionResetError("tunnel closed before its header"))

    def leg_pause_writing(self, leg: Leg) -> None:
        pass

    def leg_resume_writing(self, leg: Leg) -> None:
        pass


async def read_header(leg: Leg, kind: int, timeout: float) -> tuple[ConnectRequest | StatusReply, bytes]:
    waiter = HeaderWaiter(leg, kind)
    leg.set_receiver(waiter)
    leg.resume_reading()
    return await asyncio.wait_for(waiter.result, timeout)
