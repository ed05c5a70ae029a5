"""The tcpmesh/1 header codec: round-trips, fragmentation, and rejection of garbage and oversize input."""

import struct

import pytest
from hypothesis import given, strategies as st

from agent.proxy import header as H

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ports = st.integers(1, 65535)
flow_ids = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8))


sources = st.one_of(st.just(("", 0)), st.tuples(ipv4, ports))


@given(ipv4, ports, flow_ids, sources, st.binary(max_size=64), st.integers(1, 9))
def test_connect_round_trips_in_any_fragmentation(ip, port, flow_id, source, payload, chunk):
    request = H.ConnectRequest(ip, port, flow_id, *source)
    wire = H.encode_connect(request) + payload
    reader = H.HeaderReader(H.KIND_CONNECT)
    message = None
    rest = b""
    for i in range(0, len(wire), chunk):
        if message is None:
            message, rest = reader.feed(wire[i:i + chunk])
        else:
            rest += wire[i:i + chunk]
    assert message == request
    assert rest == payload


@given(st.sampled_from(list(H.Status)), st.text(max_size=80))
def test_status_round_trips(status, reason):
    message, rest = H.HeaderReader(H.KIND_STATUS).feed(H.encode_status(H.StatusReply(status, reason)))
    assert message == H.StatusReply(status, reason)
    assert rest == b""


def test_status_reason_is_truncated_to_the_limit():
    message, _ = H.HeaderReader(H.KIND_STATUS).feed(H.encode_status(H.StatusReply(H.Status.DENIED, "x" * 1000)))
    assert message.reason == "x" * H.MAX_REASON


@given(st.binary(min_size=1, max_size=600))
def test_garbage_is_rejected_or_waits_never_crashes(data):
    reader = H.HeaderReader(H.KIND_CONNECT)
    try:
        message, _ = reader.feed(data)
    except H.PeerProtocolError:
        return
    if message is not None:  # only a well-formed header may decode
        assert data.startswith(H.MAGIC)


@pytest.mark.parametrize("wire, words", [
    (b"GET / HTTP/1.1\r\n", "not a tcpmesh/1 header"),
    (b"\x16\x03\x01\x02\x00", "not a tcpmesh/1 header"),
    (H.PREFIX.pack(H.MAGIC, 2, H.KIND_CONNECT, 0), "unsupported tunnel header version 2"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_STATUS, 1) + b"\x00", "unexpected message kind"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, H.MAX_BODY + 1), "exceeds the limit"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, 0), "without a DEST"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, 3) + b"\x01\x09\x04", "claims 9 bytes"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, 2) + b"\x81\x00", "unknown critical TLV"),
    (H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, 9) + b"\x01\x07\x04\x0a\x00\x00\x01\x00\x00", "port 0"),
])
def test_invalid_headers_name_the_problem(wire, words):
    with pytest.raises(H.PeerProtocolError, match=words):
        H.HeaderReader(H.KIND_CONNECT).feed(wire)


def test_unknown_non_critical_tlv_is_skipped():
    dest = b"\x01\x07\x04" + bytes([10, 0, 0, 1]) + struct.pack("!H", 80)
    body = b"\x33\x02ab" + dest
    message, _ = H.HeaderReader(H.KIND_CONNECT).feed(H.PREFIX.pack(H.MAGIC, 1, H.KIND_CONNECT, len(body)) + body)
    assert message == H.ConnectRequest("10.0.0.1", 80)


def test_encoder_refuses_our_own_misuse():
    with pytest.raises(ValueError):
        H.encode_connect(H.ConnectRequest("10.0.0.1", 0))
    with pytest.raises(ValueError):
        H.encode_connect(H.ConnectRequest("10.0.0.1", 80, b"short"))
