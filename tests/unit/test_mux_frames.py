"""tcpmesh/2 frames: round trips in any fragmentation, and rejection of what breaks the protocol — for
each decoder (the pure-Python reference and its compiled twin, tests/hotpath_impls.py)."""

import pytest
from hypothesis import given, strategies as st

from agent.proxy import mux as M
from tests.hotpath_impls import IMPLEMENTATIONS, decoder_class, hotpath_impl  # noqa: F401 - a fixture

frames = st.builds(
    lambda t, s, p: M.Frame(t, s, p if t is M.FrameType.DATA else p[:64]),
    st.sampled_from([t for t in M.FrameType if t is not M.FrameType.GOAWAY]),
    st.integers(1, M.MAX_STREAM_ID), st.binary(max_size=300))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(st.lists(frames, max_size=8), st.integers(1, 50))
def test_frames_round_trip_in_any_fragmentation(impl, expected, chunk):
    wire = b"".join(M.encode(f.type, f.stream, f.payload) for f in expected)
    decoder = decoder_class(impl)()
    got = []
    for i in range(0, len(wire), chunk):
        got += decoder.feed(wire[i:i + chunk])
    assert got == expected and decoder.pending == 0


def test_whole_buffers_take_the_fast_path_and_keep_the_tail(hotpath_impl):
    wire = M.encode(M.FrameType.DATA, 1, b"x" * 100) + M.encode(M.FrameType.FIN, 1)
    decoder = M.FrameDecoder()
    assert decoder.feed(wire[:-3]) == [M.Frame(M.FrameType.DATA, 1, b"x" * 100)]
    assert decoder.pending == M.HEADER_SIZE - 3
    assert decoder.feed(wire[-3:]) == [M.Frame(M.FrameType.FIN, 1)]


@pytest.mark.parametrize("wire, words", [
    (M.HEADER.pack(99, 0, 0, 1, 0), "unknown frame type 99"),
    (M.HEADER.pack(M.FrameType.DATA, 0, 0, 1, M.MAX_FRAME + 1), "exceeds the limit"),
    (M.HEADER.pack(M.FrameType.OPEN, 0, 0, 1, M.MAX_CONTROL_PAYLOAD + 1), "exceeds"),
    (M.HEADER.pack(M.FrameType.DATA, 0, 0, 0, 0), "on stream 0"),
])
def test_protocol_violations_are_rejected(hotpath_impl, wire, words):
    with pytest.raises(M.MuxProtocolError, match=words):
        M.FrameDecoder().feed(wire)


def test_window_frames_carry_credit_and_refuse_nonsense(hotpath_impl):
    (frame,) = M.FrameDecoder().feed(M.encode_window(3, 65536))
    assert M.window_credit(frame) == 65536
    with pytest.raises(M.MuxProtocolError):
        M.window_credit(M.Frame(M.FrameType.WINDOW, 3, b"\x00\x00\x00\x00"))
    with pytest.raises(M.MuxProtocolError):
        M.window_credit(M.Frame(M.FrameType.WINDOW, 3, b"\x01"))


def merged(frames):
    """DATA payloads of consecutive frames of one stream joined (what a stream's reader sees)."""
    out = []
    for f in frames:
        if out and f.type is M.FrameType.DATA and out[-1].type is M.FrameType.DATA and out[-1].stream == f.stream:
            out[-1] = M.Frame(f.type, f.stream, out[-1].payload + f.payload)
        else:
            out.append(f)
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(st.lists(frames, max_size=8), st.integers(1, 50))
def test_parts_carry_the_same_frames_in_any_fragmentation(impl, expected, chunk):
    wire = b"".join(M.encode(f.type, f.stream, f.payload) for f in expected)
    decoder = decoder_class(impl)()
    got = []
    kinds = set()
    for i in range(0, len(wire), chunk):
        view = memoryview(bytearray(wire[i:i + chunk]))  # a reused buffer in the tunnel: nothing may keep it
        for f in decoder.feed_parts(view):
            kinds.add((f.type is M.FrameType.DATA and len(f.payload) > 0, type(f.payload)))
            got.append(M.Frame(f.type, f.stream, bytes(f.payload)))  # as a stream does: copy what is kept
        view.obj[:] = b"\xff" * len(view)  # the buffer is reused: frames already returned are unaffected
        assert decoder.pending < M.HEADER_SIZE + M.MAX_CONTROL_PAYLOAD  # DATA is never accumulated
    assert merged(got) == merged(expected) and decoder.pending == 0 and not decoder.in_data
    assert kinds <= {(True, memoryview), (False, bytes)}  # DATA bytes as views of the buffer, never copied


def test_parts_hand_out_data_as_it_arrives(hotpath_impl):
    wire = M.encode(M.FrameType.DATA, 5, b"a" * 100) + M.encode(M.FrameType.FIN, 5)
    decoder = M.FrameDecoder()
    assert decoder.feed_parts(wire[:40]) == [M.Frame(M.FrameType.DATA, 5, b"a" * 28)]
    assert decoder.in_data and decoder.pending == 0
    assert decoder.feed_parts(wire[40:-1]) == [M.Frame(M.FrameType.DATA, 5, b"a" * 72)]
    assert decoder.pending == M.HEADER_SIZE - 1
    assert decoder.feed_parts(wire[-1:]) == [M.Frame(M.FrameType.FIN, 5)]
    assert decoder.feed_parts(M.encode(M.FrameType.DATA, 7, b"")) == [M.Frame(M.FrameType.DATA, 7, b"")]


@pytest.mark.parametrize("wire, words", [
    (M.HEADER.pack(99, 0, 0, 1, 0), "unknown frame type 99"),
    (M.HEADER.pack(M.FrameType.DATA, 0, 0, 1, M.MAX_FRAME + 1), "exceeds the limit"),
    (M.HEADER.pack(M.FrameType.OPEN, 0, 0, 1, M.MAX_CONTROL_PAYLOAD + 1), "exceeds"),
    (M.HEADER.pack(M.FrameType.DATA, 0, 0, 0, 0), "on stream 0"),
])
def test_parts_reject_the_same_violations_whole_or_split(hotpath_impl, wire, words):
    with pytest.raises(M.MuxProtocolError, match=words):
        M.FrameDecoder().feed_parts(wire)
    decoder = M.FrameDecoder()
    with pytest.raises(M.MuxProtocolError, match=words):
        for byte in range(len(wire)):
            decoder.feed_parts(wire[byte:byte + 1])
