"""Fuzzing the tcpmesh/2 stream header decoder (agent/proxy/header.py) with Hypothesis: 10,000 cases
each for the CONNECT body and the STATUS body, half raw bytes, half TLV sequences built from the
real types with wrong lengths, truncation and bit flips. The decoder may refuse (PeerProtocolError,
the peer's fault) but never raise anything else, and what it accepts is always well-formed.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.proxy import header as H

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KNOWN = [H.TLV_DEST, H.TLV_FLOW_ID, H.TLV_SOURCE, H.TLV_CLIENT_PROCESS]
TLV_TYPES = KNOWN * 4 + [0, 5, 0x7F, 0x80, 0x81, 0xFF]  # mostly real types; critical unknown ones refuse


NATURAL_LENGTH = {H.TLV_DEST: 7, H.TLV_SOURCE: 7, H.TLV_FLOW_ID: 8}


def tlv_body(genome: bytes) -> bytes:
    """A TLV sequence read off ``genome`` (Hypothesis draws plain bytes, which is fast): per TLV a type
    selector byte and a mode byte, then the value. The mode mostly gives each real type its proper
    length and address family, and sometimes a lying length or a wrong family."""
    body = bytearray()
    i = 0
    if genome and genome[0] % 4:  # most sequences start with a proper DEST
        body += bytes([H.TLV_DEST, 7, H.AF_INET4]) + genome[1:7].ljust(6, b"\x01")
        i = 7
    while i + 2 <= len(genome):
        kind, mode = TLV_TYPES[genome[i] % len(TLV_TYPES)], genome[i + 1]
        natural = NATURAL_LENGTH.get(kind, 8 + mode % (H.COMM_MAX + 3) if kind == H.TLV_CLIENT_PROCESS else mode % 24)
        value = bytearray(genome[i + 2:i + 2 + natural])
        i += 2 + natural
        if kind in (H.TLV_DEST, H.TLV_SOURCE) and value and mode % 5:
            value[0] = H.AF_INET4
        length = len(value) if mode % 7 else mode  # one in seven lies about its length
        body += bytes([kind, length]) + value
    return bytes(body)


# half raw bytes, half TLV sequences of the real types
connect_bodies = st.one_of(st.binary(max_size=H.MAX_BODY + 40), st.binary(max_size=160).map(tlv_body))


def assert_well_formed(request: H.ConnectRequest) -> None:
    ipaddress.IPv4Address(request.dest_ip)
    assert 1 <= request.dest_port <= 65535
    assert request.flow_id == b"" or len(request.flow_id) == H.FLOW_ID_LEN
    if request.source_ip:
        ipaddress.IPv4Address(request.source_ip)
        assert 1 <= request.source_port <= 65535
    else:
        assert request.source_port == 0
    if request.pid is not None:
        assert 0 <= request.pid < 2 ** 32 and 0 <= request.uid < 2 ** 32
        assert isinstance(request.comm, str) and len(request.comm) <= H.COMM_MAX


@FUZZ
@given(connect_bodies)
def test_connect_decoder_refuses_or_returns_a_well_formed_request(body):
    try:
        request = H.decode_connect_body(body)
    except H.PeerProtocolError as exc:
        assert str(exc)  # the refusal says why (it goes to the flow record and the STATUS reason)
        return
    assert_well_formed(request)
    # what was accepted re-encodes to a body that decodes to the same destination and attribution
    again = H.decode_connect_body(H.encode_connect_body(request))
    assert (again.dest_ip, again.dest_port, again.flow_id, again.source_ip, again.source_port, again.pid,
            again.uid) == (request.dest_ip, request.dest_port, request.flow_id, request.source_ip,
                           request.source_port, request.pid, request.uid)


@FUZZ
@given(st.one_of(st.binary(max_size=H.MAX_REASON + 40),  # raw, and mostly known codes with any reason bytes:
                 st.binary(min_size=1, max_size=H.MAX_REASON + 3).map(lambda b: bytes([b[0] % 9]) + b[1:])))
def test_status_decoder_refuses_or_returns_a_known_status_with_a_bounded_reason(body):
    try:
        reply = H.decode_status_body(body)
    except H.PeerProtocolError:
        assert not body or body[0] not in set(H.Status) or len(body) - 1 > H.MAX_REASON
        return
    assert reply.status in set(H.Status) and len(reply.reason.encode("utf-8", "surrogatepass")) <= 3 * H.MAX_REASON
    assert H.decode_status_body(H.encode_status_body(reply)).status is reply.status
