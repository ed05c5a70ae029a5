"""The buffer budget wired into tunnels (agent.proxy.session.BufferGate): streams whose workload does not
read are counted, their identity's tunnels pause at its share while another identity's keep flowing,
draining resumes them, windows shrink under pressure, and an ended stream gives its bytes back."""

from __future__ import annotations

import asyncio
import struct

from agent.proxy import mux as M
from agent.proxy.budget import MiB, BufferBudget
from agent.proxy.session import BufferGate, MuxSession, Stream
from tests.unit.test_fuzz_mux import FakeTls

HIGH_WATER = 64 * 1024


class PausableTls(FakeTls):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.tcp_state = 1  # ESTABLISHED; 7 = CLOSE (the peer reset it)

    def socket(self):
        tls = self

        class Sock:
            def getsockopt(self, level, name, size):
                return bytes([tls.tcp_state]) + bytes(size - 1)

        return Sock()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Sink:
    """The workload's socket leg: keeps what it is written (it never reads unless told to drain)."""

    def __init__(self) -> None:
        self.buffered = 0

    def write_buffer_size(self) -> int:
        return self.buffered


class Relay:
    """Writes a stream's data to its sink and pauses the stream above the high-water mark, as agent.proxy.relay
    does through the socket transport's pause_writing."""
    takes_views = True

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def peer_of(self, leg):
        return self.sink

    def leg_data(self, leg, data) -> None:
        self.sink.buffered += len(data)
        if self.sink.buffered > HIGH_WATER and not leg._reading_paused:
            leg.pause_reading()

    def leg_eof(self, leg) -> None:
        pass

    def leg_closed(self, leg, exc) -> None:
        pass

    def drain(self, leg) -> None:
        self.sink.buffered = 0
        leg.resume_reading()


def tunnel(gate: BufferGate, identity: str, streams: int) -> tuple[MuxSession, PausableTls, list[tuple[Stream, Relay]]]:
    tls = PausableTls()
    session = MuxSession(tls, client=False, gate=gate, identity=identity).start()  # type: ignore[arg-type]
    legs = []
    for n in range(streams):
        stream = Stream(session, 2 * n + 1)
        session.streams[stream.id] = stream
        relay = Relay(Sink())
        stream.set_receiver(relay)
        legs.append((stream, relay))
    return session, tls, legs


def send(session: MuxSession, stream: Stream, size: int) -> None:
    session.leg_data(session.tls, M.encode(M.FrameType.DATA, stream.id, b"d" * size))  # type: ignore[arg-type]


def credit_sent(tls: FakeTls, stream_id: int) -> int:
    frames = M.FrameDecoder().feed(bytes(tls.sent))
    return sum(struct.unpack("!I", f.payload)[0] for f in frames if f.type is M.FrameType.WINDOW and f.stream == stream_id)


def test_a_reader_that_never_reads_pauses_its_own_tunnels_only_and_draining_resumes_them():
    async def main() -> None:
        budget = BufferBudget(16 * MiB, 2)  # shares of 4 MiB, a pool of 8 MiB
        gate = BufferGate(budget)
        slow, slow_tls, slow_legs = tunnel(gate, "spiffe://t/ns/a/sa/slow", 6)
        fast, fast_tls, fast_legs = tunnel(gate, "spiffe://t/ns/a/sa/fast", 1)
        for stream, _ in slow_legs:  # each stream's whole window, 1 MiB at a time, until the tunnel pauses
            for _ in range(4):
                if not slow_tls.paused:
                    send(slow, stream, M.MAX_FRAME)
        assert slow_tls.paused and not fast_tls.paused
        assert budget.stalls == 1 and budget.held <= budget.share + budget.pool + M.MAX_FRAME
        assert budget.held_by("spiffe://t/ns/a/sa/slow") == budget.held
        fast_stream, fast_relay = fast_legs[0]
        for _ in range(8):  # the other identity's stream keeps flowing (its workload reads)
            send(fast, fast_stream, 512 * 1024)
            fast_relay.drain(fast_stream)
        assert not fast_tls.paused and fast_relay.sink.buffered == 0
        a_new_tunnel, new_tls, _ = tunnel(gate, "spiffe://t/ns/a/sa/slow", 0)  # joins paused
        assert new_tls.paused
        stream, relay = slow_legs[0]
        relay.drain(stream)
        assert not slow_tls.paused and not new_tls.paused  # below its limit again: both resume
        for stream, _ in slow_legs[1:]:
            stream.on_reset(ConnectionResetError("gone"))
        assert budget.held == 0 and not budget.stalled

    asyncio.run(main())


def test_a_stalled_tunnel_whose_peer_gave_up_is_read_to_its_end_and_gives_its_bytes_back():
    async def main() -> None:
        budget = BufferBudget(16 * MiB, 2)
        gate = BufferGate(budget)
        session, tls, legs = tunnel(gate, "spiffe://t/ns/a/sa/slow", 6)
        for stream, _ in legs:
            for _ in range(4):
                if not tls.paused:
                    send(session, stream, M.MAX_FRAME)
        assert tls.paused and gate.wake_ended() == 0  # alive: stays paused
        tls.tcp_state = 7  # the dialling side's TCP_USER_TIMEOUT ended it: RST
        assert gate.wake_ended() == 1 and not tls.paused
        send(session, legs[5][0], 1024)  # what was still in the kernel is read, and stalls it no more
        assert not tls.paused
        session.leg_closed(tls, ConnectionResetError("reset by peer"))  # then the end: streams reset
        assert budget.held == 0 and not budget.stalled and gate.wake_ended() == 0

    asyncio.run(main())


def test_windows_shrink_as_the_budget_fills_and_grow_back_when_it_empties():
    async def main() -> None:
        budget = BufferBudget(16 * MiB, 2)
        gate = BufferGate(budget)
        _, _, hog_legs = tunnel(gate, "spiffe://t/ns/a/sa/hog", 1)
        reader, reader_tls, reader_legs = tunnel(gate, "spiffe://t/ns/a/sa/reader", 1)
        stream, relay = reader_legs[0]
        send(reader, stream, M.MAX_FRAME)
        relay.drain(stream)
        assert credit_sent(reader_tls, stream.id) == M.MAX_FRAME  # no pressure: all credit comes back
        budget.adjust("spiffe://t/ns/a/sa/hog", 12 * MiB)  # three quarters of the budget held elsewhere
        send(reader, stream, M.MAX_FRAME)
        relay.drain(stream)
        # credit held back: the peer's window shrinks towards what the budget allows (by what it sends)
        window = budget.window("spiffe://t/ns/a/sa/reader")
        assert window < M.INITIAL_WINDOW - M.MAX_FRAME
        assert credit_sent(reader_tls, stream.id) == M.MAX_FRAME and stream._debt == M.MAX_FRAME
        assert stream._threshold == window // 4  # and credit goes back in smaller steps, so it never stalls
        send(reader, stream, M.MAX_FRAME)
        send(reader, stream, M.MAX_FRAME)
        relay.drain(stream)
        assert M.INITIAL_WINDOW - stream._debt == window  # the peer may now send just the shrunk window
        budget.adjust("spiffe://t/ns/a/sa/hog", -12 * MiB)
        send(reader, stream, 64 * 1024)
        relay.drain(stream)
        assert stream._debt == 0  # the held-back credit is returned once the pressure is gone

    asyncio.run(main())


def test_without_a_budget_nothing_is_counted():
    async def main() -> None:
        tls = PausableTls()
        session = MuxSession(tls, client=False).start()  # type: ignore[arg-type]
        stream = Stream(session, 1)
        session.streams[1] = stream
        relay = Relay(Sink())
        stream.set_receiver(relay)
        send(session, stream, M.MAX_FRAME)
        assert stream._sink is None and stream._held == 0 and not tls.paused

    asyncio.run(main())
