"""The compiled hot path (agent/proxy/_hotpath.c) against its pure-Python reference: the same test
vectors through both, TLS records sealed by one opened by the other, a tunnel's reads (frames in TLS
records, in any fragmentation) with the same stream events, answers, ending and byte counts, and the
switch that chooses (agent/proxy/hotpath.py) refusing what cannot run with the fix in the message."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys

import pytest

from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.proxy import hotpath
from agent.proxy import mux as M
from agent.proxy import state
from agent.proxy.header import encode_connect_body
from agent.proxy.endpoints import READ_BUFFER, READ_CHUNK, PlainLeg
from agent.proxy.relay import Relay
from agent.proxy.session import CREDIT_THRESHOLD, SMALL_WRITE, MuxSession, Stream
from bench.tls_pair import MemoryTransport, connected_pair
from tests.hotpath_impls import IMPLEMENTATIONS, decoder_class, require_compiled, use
from tests.unit.test_endpoints_tls_buffer import Collector, contexts  # noqa: F401 - contexts: a fixture

H = M.HEADER.pack
VECTORS = {  # name: wire bytes (valid ones end cleanly or mid-frame; the rest break one rule)
    "data, fin, window": M.encode(M.FrameType.DATA, 1, b"hello") + M.encode(M.FrameType.FIN, 1)
    + M.encode_window(1, 65536),
    "empty data": M.encode(M.FrameType.DATA, 3, b""),
    "goaway on stream 0": M.encode(M.FrameType.GOAWAY, 0, b"bye"),
    "control frame at its limit": M.encode(M.FrameType.RST, 9, b"r" * M.MAX_CONTROL_PAYLOAD),
    "data at the frame limit": M.encode(M.FrameType.DATA, 5, b"d" * M.MAX_FRAME),
    "incomplete header": M.encode(M.FrameType.DATA, 1, b"x")[:7],
    "incomplete control frame": M.encode(M.FrameType.OPEN, 1, b"body")[:14],
    "incomplete data": M.encode(M.FrameType.DATA, 7, b"0123456789")[:17],
    "largest stream id": M.encode(M.FrameType.DATA, M.MAX_STREAM_ID, b"z"),
    "unknown type 0": H(0, 0, 0, 1, 0),
    "unknown type 8": H(8, 0, 0, 1, 0),
    "unknown type 255": H(255, 0, 0, 1, 0),
    "data over the limit": H(3, 0, 0, 1, M.MAX_FRAME + 1),
    "length 2**32-1": H(3, 0, 0, 1, 0xFFFFFFFF),
    "control over its limit": H(6, 0, 0, 1, M.MAX_CONTROL_PAYLOAD + 1),
    "data on stream 0": H(3, 0, 0, 0, 0),
    "fin on stream 0": H(4, 0, 0, 0, 0),
    "flags and reserved set": H(3, 0xFF, 0xFFFF, 1, 1) + b"!",
    "a bad frame after good ones": M.encode(M.FrameType.DATA, 1, b"ok") + H(9, 0, 0, 1, 0),
}


def outcome(decoder_class, wire: bytes, method: str, step: int) -> tuple:
    """What a decoder makes of ``wire`` fed ``step`` bytes at a time: frames (payloads as bytes, and their
    type) and the error text; without an error also the pending bytes and whether it is inside a DATA frame."""
    decoder = decoder_class()
    frames, error = [], None
    try:
        for at in range(0, len(wire), step):
            for f in getattr(decoder, method)(memoryview(bytearray(wire[at:at + step]))):
                frames.append((f.type, f.stream, bytes(f.payload), type(f.payload).__name__))
    except M.MuxProtocolError as exc:
        error = str(exc)
    if error is not None:  # the tunnel is closed: what the decoder still holds no longer matters
        return frames, error
    return frames, error, decoder.pending, decoder.in_data if method == "feed_parts" else None


@pytest.mark.parametrize("method", ["feed", "feed_parts"])
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_both_decoders_agree_on_every_vector_in_any_fragmentation(name, method):
    wire = VECTORS[name]
    for step in sorted({1, 5, 12, 13, 100, len(wire) or 1}):
        reference = outcome(M.PyFrameDecoder, wire, method, step)
        assert outcome(decoder_class("compiled"), wire, method, step) == reference, (name, method, step)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_frames_are_the_reference_frame_type(impl):
    for method in ("feed", "feed_parts"):
        (frame,) = getattr(decoder_class(impl)(), method)(M.encode(M.FrameType.FIN, 3))
        assert type(frame) is M.Frame and frame.type is M.FrameType.FIN and frame == M.Frame(M.FrameType.FIN, 3)


@pytest.mark.parametrize("sealer", IMPLEMENTATIONS)
@pytest.mark.parametrize("opener", IMPLEMENTATIONS)
def test_data_frames_sealed_by_one_implementation_open_with_the_other(contexts, sealer, opener):  # noqa: F811
    sizes = [0, 1, 1000, 16 * 1024 - 1, READ_CHUNK + 7]

    async def main():
        client, client_transport, server = await connected_pair(contexts)
        receiver = Collector(takes_views=True)
        server.set_receiver(receiver)
        payloads = [os.urandom(n) for n in sizes]
        with use(sealer):
            for stream, payload in enumerate(payloads, start=1):
                client.write_data_frame(stream, payload)
            client.write_eof()
        with use(opener):
            server.data_received(client_transport.take())
        return client, payloads, receiver

    client, payloads, receiver = asyncio.run(main())
    frames = M.PyFrameDecoder().feed(b"".join(receiver.chunks))
    assert [(f.type, f.stream, f.payload) for f in frames] == \
        [(M.FrameType.DATA, stream, payload) for stream, payload in enumerate(payloads, start=1)]
    assert client.bytes_written == sum(sizes) + len(sizes) * M.HEADER_SIZE
    assert receiver.eof  # close_notify: the end of the stream, told once


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_tampered_record_resets_the_tunnel_with_the_tls_error(contexts, impl):  # noqa: F811
    async def main():
        client, client_transport, server = await connected_pair(contexts)
        receiver = Collector(takes_views=True)
        server.set_receiver(receiver)
        client.write_data_frame(1, b"secret" * 100)
        records = bytearray(client_transport.take())
        records[-1] ^= 1  # the authentication tag no longer matches
        with use(impl):
            server.data_received(bytes(records))
        return server, receiver

    server, receiver = asyncio.run(main())
    assert isinstance(server.close_exc, ssl.SSLError) and receiver.chunks == []
    assert server.transport.aborted  # reset, not closed: the peer sees the tunnel fail


STALE_BUILD = ("import types\n"  # a module built from older source: it says no ABI
               "stale = types.ModuleType('agent.proxy._hotpath'); stale.__file__ = '/old/_hotpath.so'\n"
               "sys.modules['agent.proxy._hotpath'] = stale\n")


def hotpath_in_child(env_value: str | None, block_module: bool = False, stale: bool = False,
                     abi: int | None = None) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            + ("sys.modules['agent.proxy._hotpath'] = None\n" if block_module else "")
            + (STALE_BUILD if stale else "")
            + (f"stale.ABI = {abi}; stale.configure = stale.FrameDecoder = stale.receive = None\n" if abi else "")
            + "from agent.proxy import hotpath, mux\nprint(hotpath.name(), mux.FrameDecoder.__module__)\n")
    env = {k: v for k, v in os.environ.items() if k != "TCPMESH_HOTPATH"}
    if env_value is not None:
        env["TCPMESH_HOTPATH"] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_the_switch_chooses_and_refuses_what_cannot_run():
    python = hotpath_in_child("python")
    assert python.stdout.split() == ["python", "agent.proxy.mux"], python.stderr
    missing = hotpath_in_child(None, block_module=True)  # not built: the pure-Python path, no error
    assert missing.stdout.split() == ["python", "agent.proxy.mux"], missing.stderr
    forced = hotpath_in_child("compiled", block_module=True)
    assert forced.returncode != 0 and "TCPMESH_HOTPATH=compiled" in forced.stderr and "make setup" in forced.stderr
    old = hotpath_in_child(None, stale=True)  # a checkout updated without `make setup`: never called
    assert old.stdout.split() == ["python", "agent.proxy.mux"], old.stderr
    old_forced = hotpath_in_child("compiled", stale=True)
    assert old_forced.returncode != 0 and "stale: built with ABI 0" in old_forced.stderr, old_forced.stderr
    half = hotpath_in_child("compiled", stale=True, abi=hotpath.ABI)  # the right ABI, entry points missing
    assert half.returncode != 0 and "lacks seal_data, decrypt, relay_send, LegCore" in half.stderr, half.stderr
    wrong = hotpath_in_child("fast")
    assert wrong.returncode != 0 and "'fast' is not one of compiled, python" in wrong.stderr
    if hotpath.built is not None:
        assert hotpath.built.ABI == hotpath.ABI
        default = hotpath_in_child(None)
        assert default.stdout.split() == ["compiled", "agent.proxy._hotpath"], default.stderr


OPEN_BODY = encode_connect_body(ConnectionFacts("10.0.0.1", 80, b"12345678", "10.0.0.2", 4000,
                                                ClientProcess(7, 0, "app")))
BIG = bytes(range(256)) * ((2 * READ_CHUNK + 4099) // 256)  # fills the plaintext buffer twice: the "call again" path
TUNNEL_READS = {  # name: (tcpmesh/2 frames the client sends, whether it ends with close_notify)
    "open, data, a large frame, fin, close_notify": (
        M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + M.encode(M.FrameType.DATA, 1, b"hello")
        + M.encode(M.FrameType.DATA, 1, BIG) + M.encode(M.FrameType.DATA, 1, b"") + M.encode(M.FrameType.FIN, 1),
        True),
    "credit returned past the threshold": (
        M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + b"".join(M.encode(M.FrameType.DATA, 1, BIG) for _ in range(3)),
        False),
    "window, reset, data for gone streams, goaway": (
        M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + M.encode(M.FrameType.OPEN, 3, OPEN_BODY)
        + M.encode_window(1, 100) + M.encode(M.FrameType.RST, 3, b"bye") + M.encode(M.FrameType.DATA, 3, b"late")
        + M.encode(M.FrameType.DATA, 5, b"nobody") + M.encode(M.FrameType.GOAWAY, 0, b"drain")
        + M.encode(M.FrameType.DATA, 1, b"still"), False),
    "data after fin closes the tunnel": (
        M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + M.encode(M.FrameType.FIN, 1) + M.encode(M.FrameType.DATA, 1, b"x")
        + M.encode(M.FrameType.DATA, 1, b"never"), False),
    "an unknown frame type after data": (
        M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + M.encode(M.FrameType.DATA, 1, b"ok") + H(9, 0, 0, 1, 0), False),
    "an unreadable OPEN": (M.encode(M.FrameType.OPEN, 1, b"\xff" * 9) + M.encode(M.FrameType.DATA, 1, b"x"), False),
    "an OPEN with an even id": (M.encode(M.FrameType.OPEN, 2, OPEN_BODY), False),
    "a zero WINDOW": (M.encode(M.FrameType.OPEN, 1, OPEN_BODY) + M.encode(M.FrameType.WINDOW, 1, b"\0\0\0\0"), False),
}


class Recorder(Collector):
    """A stream's receiver that writes what it is told into one log shared by the tunnel's streams."""

    def __init__(self, log: list, stream_id: int) -> None:
        super().__init__(takes_views=True)
        self.log, self.id = log, stream_id

    def leg_data(self, leg, data) -> None:
        self.log.append((self.id, "data", bytes(data)))

    def leg_eof(self, leg) -> None:
        self.log.append((self.id, "eof"))

    def leg_closed(self, leg, exc) -> None:
        self.log.append((self.id, "closed", str(exc)))


def tunnel_outcome(contexts, impl: str, wire: bytes, close_notify: bool, step: int) -> tuple:  # noqa: F811
    """What a server session on ``impl``'s data path does with ``wire``, arriving ``step`` bytes of TLS
    records per socket read (``TlsLeg.buffer_updated``, as uvloop calls it): every stream event in order,
    the frames it sent back, how the tunnel ended, and the TLS leg's and streams' byte counts."""
    async def main():
        log: list = []
        with use(impl):
            client, client_transport, server = await connected_pair(contexts)
            streams = []

            def on_open(stream, request):
                streams.append(stream)
                stream.set_receiver(Recorder(log, stream.id))

            session = MuxSession(server, client=False, on_open=on_open,
                                 on_bad_open=lambda stream, why: log.append((stream.id, "bad open", why))).start()
            assert (server._frames is session) == (impl == "compiled")  # the path under test is the one taken
            client.write(wire)
            if close_notify:
                client.write_eof()
            records = client_transport.take()
            for at in range(0, len(records), step):
                piece = records[at:at + step]
                server.get_buffer(len(piece))[:len(piece)] = piece
                server.buffer_updated(len(piece))
                if server.transport.is_closing():
                    break
        answers = Collector(takes_views=False)
        client.set_receiver(answers)
        client.data_received(server.transport.take())
        sent = [(f.type, f.stream, f.payload) for f in M.PyFrameDecoder().feed(b"".join(answers.chunks))]
        return (log, sent, session.closed.result() if session.closed.done() else None, server.bytes_read,
                [(s.id, s.bytes_read, s.peer_eof) for s in streams], server.transport.aborted)

    return asyncio.run(main())


@pytest.mark.parametrize("name", sorted(TUNNEL_READS))
def test_a_tunnel_read_has_the_same_outcome_on_both_paths(contexts, name):  # noqa: F811
    """The compiled one-call receive (agent.proxy._hotpath.receive via TlsLeg.route_frames) against the
    reference steps (TlsLeg.data_received → _decrypt_into → MuxSession.leg_data), in any fragmentation."""
    wire, close_notify = TUNNEL_READS[name]
    for step in (7, 1000, 70_000, READ_BUFFER):  # READ_BUFFER: the most one socket read brings
        reference = tunnel_outcome(contexts, "python", wire, close_notify, step)
        assert reference[0] or reference[2], "a vector that does nothing tests nothing"
        assert tunnel_outcome(contexts, "compiled", wire, close_notify, step) == reference, (name, step)


class AppSocket(MemoryTransport):
    """The workload's socket under a relayed stream: every write, half-close and flow-control call logged."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def write(self, data) -> None:
        self.log.append(("app got", bytes(data)))

    def write_eof(self) -> None:
        self.log.append(("app got", "eof"))

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.log.append(("app reading", "paused"))

    def resume_reading(self) -> None:
        self.log.append(("app reading", "resumed"))


SMALL = SMALL_WRITE - 1  # the largest app read that is sealed as one frame
SEND_WINDOW_READS = M.INITIAL_WINDOW // SMALL + 1  # app reads that use the stream's send window up
RELAYS = {  # name: steps — ("tunnel", frames the peer sends on stream 1), ("app", bytes the workload sends),
    # or an event: the app's socket full / drained, the tunnel's full / drained, the app's EOF, its socket closing
    "ping-pong, then both ends close": [
        ("tunnel", M.encode(M.FrameType.DATA, 1, b"hello")), ("app", b"world"),
        ("tunnel", M.encode(M.FrameType.DATA, 1, b"x" * 100) + M.encode(M.FrameType.DATA, 1, b"y")), ("app", b"z"),
        ("tunnel", M.encode(M.FrameType.FIN, 1)), ("app", b"after the peer's fin"), ("app eof",)],
    "the app closes first": [("app", b"q"), ("app eof",), ("app", b"late"), ("tunnel", M.encode(M.FrameType.DATA, 1, b"a")),
                             ("tunnel", M.encode(M.FrameType.FIN, 1))],
    "credit returned past the threshold": [("tunnel", b"".join(M.encode(M.FrameType.DATA, 1, b"c" * 60_000)
                                                               for _ in range(CREDIT_THRESHOLD // 60_000 + 2)))],
    "credit held while the app's socket is full": [
        ("app full",), ("tunnel", b"".join(M.encode(M.FrameType.DATA, 1, b"h" * 60_000)
                                           for _ in range(CREDIT_THRESHOLD // 60_000 + 2))),
        ("app drained",), ("tunnel", M.encode(M.FrameType.DATA, 1, b"after"))],
    "the peer sends beyond its window": [
        ("app full",), ("tunnel", b"".join(M.encode(M.FrameType.DATA, 1, b"w" * 60_000)
                                           for _ in range((M.INITIAL_WINDOW + CREDIT_THRESHOLD) // 60_000 + 2)))],
    "the app uses the send window up, then credit": [("app", b"s" * SMALL)] * SEND_WINDOW_READS + [
        ("app", b"queued"), ("tunnel", M.encode_window(1, 100)), ("app", b"more"),
        ("tunnel", M.encode_window(1, M.INITIAL_WINDOW)), ("app", b"flows again")],
    "the app uses the send window up exactly": [("app", b"e" * SMALL)] * (M.INITIAL_WINDOW // SMALL_WRITE) + [
        ("app", b"e" * (M.INITIAL_WINDOW // SMALL_WRITE)), ("app", b"queued"), ("tunnel", M.encode_window(1, 10))],
    "the tunnel's buffer is full": [("tunnel full",), ("app", b"a"), ("app", b"b"), ("tunnel drained",), ("app", b"c")],
    "the app's socket is closing": [("app closing",), ("tunnel", M.encode(M.FrameType.DATA, 1, b"dropped"))],
    "the peer resets the stream": [("app", b"a"), ("tunnel", M.encode(M.FrameType.RST, 1, b"bye")), ("app", b"late")],
    "data after the peer's fin": [("tunnel", M.encode(M.FrameType.FIN, 1) + M.encode(M.FrameType.DATA, 1, b"x"))],
    "a large read from the app": [("app", bytes(range(256)) * 300), ("tunnel", M.encode(M.FrameType.DATA, 1, BIG))],
}


def relay_outcome(contexts, impl: str, steps: list, stream_first: bool) -> tuple:  # noqa: F811
    """What a relay between a stream of a server session and a workload's socket (a ``PlainLeg``) does
    with ``steps`` on ``impl``'s data path, the legs driven as uvloop drives them (``get_buffer`` +
    ``buffer_updated``): the app's socket's log, the frames the tunnel sent, the relay's result and
    every leg's byte counts, window and credit state."""
    async def main():
        log: list = []
        with use(impl):
            client, client_transport, server = await connected_pair(contexts)
            relays = []

            def on_open(stream, request):
                app = PlainLeg()
                app.connection_made(AppSocket(log))
                relay = Relay(stream, app) if stream_first else Relay(app, stream)
                relays.append((relay, stream, app))
                relay.start()

            session = MuxSession(server, client=False, on_open=on_open).start()
            client.write(M.encode(M.FrameType.OPEN, 1, OPEN_BODY))
            server.data_received(client_transport.take())
            ((relay, stream, app),) = relays
            for step in steps:
                if step[0] == "tunnel":
                    client.write(step[1])
                    records = client_transport.take()
                    for at in range(0, len(records), 70_000):
                        piece = records[at:at + 70_000]
                        server.get_buffer(len(piece))[:len(piece)] = piece
                        server.buffer_updated(len(piece))
                elif step[0] == "app":
                    if not app.transport.is_closing():
                        app.get_buffer(len(step[1]))[:len(step[1])] = step[1]
                        app.buffer_updated(len(step[1]))
                elif step[0] == "app eof":
                    app.eof_received()
                elif step[0] == "app closing":
                    app.transport.close()
                else:
                    leg, call = {"app full": (app, "pause_writing"), "app drained": (app, "resume_writing"),
                                 "tunnel full": (server, "pause_writing"),
                                 "tunnel drained": (server, "resume_writing")}[step[0]]
                    getattr(leg, call)()
                log.append(("state", stream.send_window, stream._unreturned, stream._writer_blocked,
                            stream.peer_eof, stream.eof_sent, len(stream._queued or ())))
        answers = Collector(takes_views=False)
        client.set_receiver(answers)
        client.data_received(server.transport.take())
        sent = [(f.type, f.stream, f.payload) for f in M.PyFrameDecoder().feed(b"".join(answers.chunks))]
        result = relay.done.result() if relay.done.done() else None
        return (log, sent, result, relay.a_to_b, relay.b_to_a, session.closed.result() if session.closed.done() else None,
                [(leg.bytes_read, leg.bytes_written) for leg in (server, stream, app)], server.transport.aborted)

    return asyncio.run(main())


@pytest.mark.parametrize("stream_first", [True, False], ids=["inbound order", "outbound order"])
@pytest.mark.parametrize("name", sorted(RELAYS))
def test_a_relayed_stream_has_the_same_outcome_on_both_paths(contexts, name, stream_first):  # noqa: F811
    """The compiled relay step (agent.proxy._hotpath: ``receive`` handing a small DATA part straight to
    the workload's socket) against the reference steps (Stream.on_data, Relay.leg_data, PlainLeg.write),
    with the send side (PlainLeg.buffer_updated → Stream.write) in the same vectors:
    the same bytes to the app and the tunnel, half-closes, resets, credit, window and byte counts."""
    reference = relay_outcome(contexts, "python", RELAYS[name], stream_first)
    changed = len({entry for entry in reference[0] if entry[0] == "state"}) > 1
    assert changed or reference[1] or reference[2] or reference[5], "a vector that does nothing tests nothing"
    assert relay_outcome(contexts, "compiled", RELAYS[name], stream_first) == reference, name


def test_the_compiled_relay_step_is_the_one_taken(contexts, monkeypatch):  # noqa: F811
    """On the compiled path a small message from the tunnel reaches the workload's socket without
    Stream.on_data or Relay.leg_data, and one from the workload reaches the tunnel without Relay.leg_data or
    Stream.write (else the comparison above would compare the reference with itself). Under
    TCPMESH_HOTPATH=python (.ci/run) the objects sit on the pure-Python cores (agent/proxy/state.py), which
    the compiled steps must leave to the Python steps."""
    compiled_cores = state.StreamCore is not state.PyStreamCore
    calls: list = []
    for cls, name in ((Stream, "on_data"), (Relay, "leg_data"), (Stream, "write")):
        def counted(self, *args, _original=getattr(cls, name), _name=name):
            calls.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(cls, name, counted)
    steps = RELAYS["ping-pong, then both ends close"]
    for stream_first in (True, False):
        calls.clear()
        relay_outcome(contexts, "python", steps, stream_first)
        assert calls.count("on_data") == 3 and calls.count("leg_data") == 6  # three messages each way
        assert calls.count("write") == 3
        python_calls = sorted(calls)
        calls.clear()
        relay_outcome(contexts, "compiled", steps, stream_first)
        assert sorted(calls) == ([] if compiled_cores else python_calls), stream_first


def test_the_compiled_cores_have_the_fields_of_their_python_twins():
    """agent/proxy/state.py: each compiled core type (agent/proxy/_hotpath.c) has exactly the fields of its
    pure-Python twin, as slots (member descriptors) on the same base, so either holds the same objects."""
    require_compiled()
    for name, twin in state.PYTHON.items():
        core = getattr(hotpath.built, name)
        own = {key for key, value in vars(core).items() if type(value).__name__ == "member_descriptor"}
        assert own == set(state.FIELDS[name]) == set(twin.__slots__), name
        assert core.__base__.__name__ == twin.__base__.__name__.removeprefix("Py"), name


def test_the_reference_path_holds_the_fields_in_python_slots():
    """With TCPMESH_HOTPATH=python the data path's classes sit on the pure-Python cores, and each class the
    compiled steps take is the layout child of its core (what _hotpath.c checks instead of a registry)."""
    code = ("from agent.proxy.session import MuxSession, Stream\nfrom agent.proxy.endpoints import PlainLeg, TlsLeg\n"
            "from agent.proxy.relay import Relay\n"
            "print(*(f'{c.__name__}:{c.__base__.__module__}.{c.__base__.__name__}' for c in "
            "(Stream, PlainLeg, TlsLeg, Relay, MuxSession)))\n")
    for env_value, module, prefix in (("python", "agent.proxy.state", "Py"), (None, "agent.proxy._hotpath", "")):
        if env_value is None:
            require_compiled()
        env = {k: v for k, v in os.environ.items() if k != "TCPMESH_HOTPATH"}
        if env_value is not None:
            env["TCPMESH_HOTPATH"] = env_value
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert run.stdout.split() == [f"{cls}:{module}.{prefix}{core}" for cls, core in (
            ("Stream", "StreamCore"), ("PlainLeg", "PlainCore"), ("TlsLeg", "TlsCore"), ("Relay", "RelayCore"),
            ("MuxSession", "SessionCore"))], run.stderr
