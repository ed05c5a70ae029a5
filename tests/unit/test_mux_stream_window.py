"""A stream's send window and the relay: the application is paused when the window is used up (not
only once data has to wait), resumed by the peer's credit, and data past the window goes out after it."""

from __future__ import annotations

import asyncio

from agent.proxy import mux as M
from agent.proxy.session import MuxSession, Stream
from tests.unit.test_fuzz_mux import FakeTls


class Relay:
    takes_views = True

    def __init__(self) -> None:
        self.events: list[str] = []

    def leg_data(self, leg, data) -> None:
        pass

    def leg_eof(self, leg) -> None:
        pass

    def leg_closed(self, leg, exc) -> None:
        pass

    def leg_pause_writing(self, leg) -> None:
        self.events.append("pause")

    def leg_resume_writing(self, leg) -> None:
        self.events.append("resume")


def sent_data(tls: FakeTls, stream_id: int) -> bytes:
    frames = M.FrameDecoder().feed(bytes(tls.sent))
    return b"".join(f.payload for f in frames if f.type is M.FrameType.DATA and f.stream == stream_id)


def run(body) -> None:
    async def main() -> None:
        tls = FakeTls()
        session = MuxSession(tls, client=True).start()  # type: ignore[arg-type]
        stream = Stream(session, 1)
        session.streams[1] = stream
        relay = Relay()
        stream.set_receiver(relay)
        body(tls, stream, relay)

    asyncio.run(main())


def test_using_up_the_window_pauses_the_application_and_credit_resumes_it():
    def body(tls, stream, relay):
        half = b"a" * (M.INITIAL_WINDOW // 2)
        stream.write(memoryview(bytearray(half)))
        assert relay.events == []
        stream.write(memoryview(bytearray(half)))  # exactly the window: all sent, nothing waits
        assert relay.events == ["pause"]
        assert len(sent_data(tls, 1)) == M.INITIAL_WINDOW
        stream.on_window(1000)
        assert relay.events == ["pause", "resume"]

    run(body)


def test_data_past_the_window_waits_intact_though_its_buffer_is_reused_and_goes_out_with_credit():
    def body(tls, stream, relay):
        buffer = bytearray(b"x" * (M.INITIAL_WINDOW - 10) + b"0123456789" + b"ABCDEFGHIJ")
        stream.write(memoryview(buffer))
        buffer[:] = b"\xee" * len(buffer)  # the shared read buffer is reused for the next read
        assert relay.events == ["pause"]
        assert sent_data(tls, 1).endswith(b"0123456789")
        stream.on_window(4)
        assert sent_data(tls, 1).endswith(b"ABCD") and relay.events == ["pause"]  # window used up again
        stream.on_window(100)
        assert sent_data(tls, 1).endswith(b"0123456789ABCDEFGHIJ") and relay.events == ["pause", "resume"]

    run(body)
