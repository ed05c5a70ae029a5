"""Fuzzing the tcpmesh/2 stream header decoder (agent/proxy/header.py) with Hypothesis: 10,000 cases
each for the CONNECT body and the STATUS body.

CONNECT bodies are built by ``body_from`` from the real TLVs (DEST, FLOW_ID, SOURCE, CLIENT_PROCESS,
unknown non-critical types, in any order), and one in three is broken in exactly one place (a
lying length, a wrong family, port 0, a missing DEST, an unknown critical type, a FLOW_ID or
CLIENT_PROCESS of the wrong size, a body over the limit). Properties: a valid body decodes to exactly
the values it was built from (an oracle independent of the decoder), a broken one is refused with a
PeerProtocolError naming the fault; raw bytes are refused or decode to a well-formed request that
re-encodes to the same values. A seeded test requires >= 60 % of the built bodies to be valid, so a
decoder that refused everything fails.
"""

from __future__ import annotations

import ipaddress
import random
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.connection.facts import ConnectionFacts
from agent.proxy import header as H

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Genome:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 1

    def take(self, n: int) -> bytes:
        return bytes(self.byte() for _ in range(n))


def _address(g: Genome) -> tuple[str, int]:
    return str(ipaddress.IPv4Address(g.take(4))), 1 + (g.byte() << 8 | g.byte()) % 65535


def _address_tlv(kind: int, address: tuple[str, int]) -> bytes:
    return bytes([kind, 7, H.AF_INET4]) + ipaddress.IPv4Address(address[0]).packed + struct.pack("!H", address[1])


# fault: (words in the refusal, how to break the list of (kind, TLV bytes) in place)
def _lie(tlvs, g):
    i = g.byte() % len(tlvs)
    kind, raw = tlvs[i]
    tlvs[i] = (kind, raw[:1] + bytes([raw[1] + 1 + g.byte() % 4]) + raw[2:])  # claims more than follows...
    del tlvs[i + 1:]  # ...at the end of the body


FAULTS = {
    "lying length": (" present", _lie),
    "wrong family": ("must be af=4", lambda t, g: t.__setitem__(0, (H.TLV_DEST, t[0][1][:2] + b"\x06" + t[0][1][3:]))),
    "port 0": ("port 0", lambda t, g: t.__setitem__(0, (H.TLV_DEST, t[0][1][:-2] + b"\0\0"))),
    "no DEST": ("without a DEST", lambda t, g: t.pop(0)),
    "critical unknown": ("unknown critical TLV", lambda t, g: t.insert(g.byte() % (len(t) + 1),
                                                                      (0x80, bytes([0x80 | g.byte() % 0x80, 0])))),
    "FLOW_ID size": ("FLOW_ID TLV must be", lambda t, g: t.append((H.TLV_FLOW_ID, bytes([H.TLV_FLOW_ID, 7]) + g.take(7)))),
    "CLIENT_PROCESS size": ("CLIENT_PROCESS TLV of", lambda t, g: t.append((H.TLV_CLIENT_PROCESS,
                                                                           bytes([H.TLV_CLIENT_PROCESS, 5]) + g.take(5)))),
    "over the limit": ("exceeds the limit", lambda t, g: t.extend([(0x7F, bytes([0x7F, 255]) + bytes(255))] * 2)),
}
FAULT_NAMES = sorted(FAULTS)


def body_from(data: bytes) -> tuple[bytes, dict | None, str | None]:
    """(body, the values a valid body carries or None, the fault or None)."""
    g = Genome(data)
    dest = _address(g)
    expected = {"dest": dest, "flow_id": b"", "source": ("", 0), "process": (None, None, None)}
    tlvs = [(H.TLV_DEST, _address_tlv(H.TLV_DEST, dest))]
    for _ in range(g.byte() % 5):
        kind = g.byte() % 5
        if kind == 0:
            expected["flow_id"] = g.take(8)
            tlvs.append((H.TLV_FLOW_ID, bytes([H.TLV_FLOW_ID, 8]) + expected["flow_id"]))
        elif kind == 1:
            expected["source"] = _address(g)
            tlvs.append((H.TLV_SOURCE, _address_tlv(H.TLV_SOURCE, expected["source"])))
        elif kind == 2:
            pid, uid = struct.unpack("!II", g.take(8))
            comm = bytes(0x61 + b % 26 for b in g.take(g.byte() % (H.COMM_MAX + 1)))
            expected["process"] = (pid, uid, comm.decode())
            tlvs.append((H.TLV_CLIENT_PROCESS, bytes([H.TLV_CLIENT_PROCESS, 8 + len(comm)]) +
                         struct.pack("!II", pid, uid) + comm))
        else:  # an unknown non-critical TLV: skipped
            value = g.take(g.byte() % 12)
            tlvs.append((6 + g.byte() % 0x79, bytes([6 + g.byte() % 0x79, len(value)]) + value))  # 5: SERVICE
    if g.byte() % 8 == 0:  # DEST need not come first
        tlvs.append(tlvs.pop(0))
    fault = FAULT_NAMES[g.byte() % len(FAULT_NAMES)] if g.byte() % 3 == 0 else None
    if fault is not None:
        if tlvs[0][0] != H.TLV_DEST:
            tlvs.insert(0, tlvs.pop())  # the faults that change DEST expect it first
        FAULTS[fault][1](tlvs, g)
        expected = None
    return b"".join(raw for _, raw in tlvs), expected, fault


def decode(body: bytes, expected: dict | None, fault: str | None) -> bool:
    """Check one built body against what it was built from; True if it was accepted."""
    try:
        request = H.decode_connect_body(body)
    except H.PeerProtocolError as exc:
        assert fault is not None, f"a valid body was refused: {exc} ({body.hex()})"
        assert FAULTS[fault][0] in str(exc), (fault, str(exc))
        return False
    assert fault is None, f"a body with a {fault} was accepted: {body.hex()}"
    process = request.process
    got = {"dest": (request.destination_ip, request.destination_port), "flow_id": request.flow_id,
           "source": (request.source_ip, request.source_port),
           "process": (None, None, None) if process is None else (process.pid, process.uid, process.comm)}
    assert got == expected, (got, expected)
    return True


def assert_well_formed(request: ConnectionFacts) -> None:
    ipaddress.IPv4Address(request.destination_ip)
    assert 1 <= request.destination_port <= 65535
    assert request.flow_id == b"" or len(request.flow_id) == H.FLOW_ID_LEN
    if request.source_ip:
        ipaddress.IPv4Address(request.source_ip)
        assert 1 <= request.source_port <= 65535
    else:
        assert request.source_port == 0
    if request.process is not None:
        assert 0 <= request.process.pid < 2 ** 32 and 0 <= request.process.uid < 2 ** 32
        assert isinstance(request.process.comm, str) and len(request.process.comm) <= H.COMM_MAX
    assert request.cgroup_id is None  # never on the wire


@FUZZ
@given(st.binary(min_size=4, max_size=120))
def test_built_connect_bodies_decode_to_what_they_carry_or_are_refused_naming_the_fault(data):
    decode(*body_from(data))


@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=H.MAX_BODY + 40))
def test_raw_bytes_are_refused_or_decode_to_a_well_formed_request(body):
    try:
        request = H.decode_connect_body(body)
    except H.PeerProtocolError as exc:
        assert str(exc)  # the refusal says why (it goes to the flow record and the STATUS reason)
        return
    assert_well_formed(request)
    # what was accepted re-encodes to a body that decodes to the same destination and attribution
    again = H.decode_connect_body(H.encode_connect_body(request))
    same = (lambda r: (r.destination_ip, r.destination_port, r.flow_id, r.source_ip, r.source_port,
                       None if r.process is None else (r.process.pid, r.process.uid)))
    assert same(again) == same(request)


def test_the_generator_mostly_builds_valid_bodies_and_reaches_every_fault():
    rng = random.Random(21)
    accepted, faults = 0, set()
    for _ in range(3_000):
        body, expected, fault = body_from(rng.randbytes(rng.randint(4, 120)))
        accepted += decode(body, expected, fault)
        faults.add(fault)
    assert accepted >= 0.6 * 3_000, accepted
    assert faults == set(FAULTS) | {None}, set(FAULTS) - faults


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
