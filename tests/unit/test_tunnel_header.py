"""The stream header codec (CONNECT body of an OPEN frame, STATUS body): round trips, and rejection of
garbage and oversize input."""

import struct

import pytest
from hypothesis import given, strategies as st

from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.proxy import header as H

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ports = st.integers(1, 65535)
flow_ids = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8))
sources = st.one_of(st.just(("", 0)), st.tuples(ipv4, ports))
processes = st.one_of(st.none(),
                      st.builds(ClientProcess, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=16)))
policies = st.one_of(st.just(""), st.from_regex(r"[a-z0-9-]{1,20}/[a-z0-9-]{1,20}", fullmatch=True))
reasons = st.text(max_size=80).filter(lambda r: not r.startswith(H.DENIED_POLICY_PREFIX))


services = st.one_of(st.just(""), st.from_regex(r"[a-z0-9-]{1,63}/[a-z0-9-]{1,63}", fullmatch=True))


@given(ipv4, ports, flow_ids, sources, processes, services)
def test_connect_round_trips(ip, port, flow_id, source, process, service):
    request = ConnectionFacts(ip, port, flow_id, *source, process, service=service)
    assert H.decode_connect_body(H.encode_connect_body(request)) == request


def test_the_service_tlv_is_non_critical_so_older_receivers_skip_it():
    body = H.encode_connect_body(ConnectionFacts("10.0.0.1", 5432, service="data/db"))
    assert body[-(2 + len("data/db")):] == bytes([H.TLV_SERVICE, 7]) + b"data/db"
    assert not H.TLV_SERVICE & H.TLV_CRITICAL
    # what a receiver without TLV 5 decodes: the same connection, no Service
    assert H.decode_connect_body(body[:-(2 + 7)]) == ConnectionFacts("10.0.0.1", 5432)
    with pytest.raises(H.PeerProtocolError, match="SERVICE TLV"):
        H.decode_connect_body(body[:-(2 + 7)] + bytes([H.TLV_SERVICE, 0]))
    with pytest.raises(ValueError):
        H.encode_connect_body(ConnectionFacts("10.0.0.1", 5432, service="x" * 128))


@given(st.sampled_from(list(H.Status)), reasons)
def test_status_round_trips(status, reason):
    assert H.decode_status_body(H.encode_status_body(H.StatusReply(status, reason))) == H.StatusReply(status, reason)


@given(policies, reasons)
def test_a_denied_status_carries_the_deciding_policy_as_its_own_field(policy, reason):
    reply = H.StatusReply(H.Status.DENIED, reason, policy)
    body = H.encode_status_body(reply)
    assert H.decode_status_body(body) == reply
    # on the wire, as docs/protocol.md says and every tcpmesh/2 peer reads it: the policy prefixes the reason
    assert body[1:].decode() == (f"policy {policy}: {reason}" if policy else reason)


def test_only_a_denied_status_names_a_policy():
    reply = H.decode_status_body(H.encode_status_body(H.StatusReply(H.Status.UNREACHABLE, "policy a/b: no")))
    assert reply == H.StatusReply(H.Status.UNREACHABLE, "policy a/b: no") and reply.policy == ""


def test_status_reason_is_truncated_to_the_limit():
    reply = H.decode_status_body(H.encode_status_body(H.StatusReply(H.Status.DENIED, "x" * 1000)))
    assert reply.reason == "x" * H.MAX_REASON


DEST = b"\x01\x07\x04" + bytes([10, 0, 0, 1]) + struct.pack("!H", 80)


@pytest.mark.parametrize("body, words", [
    (b"", "without a DEST"),
    (b"\x01\x09\x04", "claims 9 bytes"),
    (b"\x01", "truncated TLV"),
    (b"\x81\x00" + DEST, "unknown critical TLV"),
    (b"\x01\x07\x04\x0a\x00\x00\x01\x00\x00", "port 0"),
    (b"\x01\x05\x06\x00\x00\x00\x00", "DEST TLV must be af=4"),
    (b"\x02\x03abc" + DEST, "FLOW_ID TLV must be 8 bytes"),
    (b"\x04\x03abc" + DEST, "CLIENT_PROCESS TLV of 3 bytes"),
    (DEST + b"\x00" * (H.MAX_BODY + 1), "exceeds the limit"),
])
def test_invalid_connect_bodies_name_the_problem(body, words):
    with pytest.raises(H.PeerProtocolError, match=words):
        H.decode_connect_body(body)


@pytest.mark.parametrize("body, words", [(b"", "empty STATUS"), (b"\x63", "unknown status code 99")])
def test_invalid_status_bodies_name_the_problem(body, words):
    with pytest.raises(H.PeerProtocolError, match=words):
        H.decode_status_body(body)


def test_unknown_non_critical_tlv_is_skipped():
    assert H.decode_connect_body(b"\x33\x02ab" + DEST) == ConnectionFacts("10.0.0.1", 80)


def test_encoder_refuses_our_own_misuse():
    with pytest.raises(ValueError):
        H.encode_connect_body(ConnectionFacts("10.0.0.1", 0))
    with pytest.raises(ValueError):
        H.encode_connect_body(ConnectionFacts("10.0.0.1", 80, b"short"))
