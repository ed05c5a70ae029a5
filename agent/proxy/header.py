"""The stream header of tcpmesh/2: the CONNECT request an OPEN frame carries, and the STATUS reply.

A CONNECT body is the wire form of the connection's ``ConnectionFacts`` (agent.connection.facts): the
source node encodes the value its proxy built from the capture, the destination node decodes the same
value (without ``cgroup_id``, which stays on the source node). A DENIED STATUS names the deciding
policy as the documented prefix of its reason ("policy <namespace>/<name>: "); ``StatusReply`` holds
it as its own field, and only this codec writes or reads that prefix.

Sans-io: ``encode_*_body`` return bytes; ``decode_*_body`` parse them. Errors distinguish the peer's
fault (``PeerProtocolError``) from ours (``ValueError`` on encode). docs/protocol.md has the format:

    CONNECT body = TLV*  (type:u8, len:u8, value)   TLV 1 DEST (af:u8=4, ipv4:4 | af=6, ipv6:16; port:u16),
                   TLV 2 FLOW_ID (8 bytes), TLV 3 SOURCE (af:u8=4|6, address, port:u16),
                   TLV 4 CLIENT_PROCESS (pid:u32, uid:u32, comm: ≤ 16 bytes utf-8),
                   TLV 5 SERVICE (namespace/name of the dialled Service, utf-8)
    STATUS body  = status:u8 reason (utf-8, ≤ 255 bytes; DENIED: "policy <ns>/<name>: " + reason when a
                   policy decided)

A TLV type with bit 0x80 set is critical: a receiver that does not know it rejects the request;
unknown non-critical TLVs are skipped.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from agent.connection.facts import ClientProcess, ConnectionFacts

MAX_BODY = 512
MAX_REASON = 255
TLV_DEST = 1
TLV_FLOW_ID = 2
TLV_SOURCE = 3
TLV_CLIENT_PROCESS = 4
TLV_SERVICE = 5   # non-critical: receivers before it skip it (their destination_service stays "unknown")
SERVICE_MAX = 127  # a namespace and a name, DNS labels of ≤ 63 bytes each, and the "/"
COMM_MAX = 16
TLV_CRITICAL = 0x80
FLOW_ID_LEN = 8
AF_INET4 = 4
AF_INET6 = 6
DENIED_POLICY_PREFIX = "policy "  # a DENIED reason starts "policy <namespace>/<name>: " (docs/protocol.md)


class PeerProtocolError(Exception):
    """The peer sent bytes that are not a valid tcpmesh/2 stream header."""


class Status(enum.IntEnum):
    OK = 0
    DENIED = 1
    UNREACHABLE = 2  # the destination refused or could not be routed to
    TIMEOUT = 3
    BAD_REQUEST = 4
    UNKNOWN_DESTINATION = 5  # the destination is not a workload on this node
    INTERNAL = 6
    OVERLOADED = 7  # a connection limit of the destination node was reached (agent.proxy.limits)


@dataclass(frozen=True)
class StatusReply:
    status: Status
    reason: str = ""
    policy: str = ""  # DENIED: the policy that decided (namespace/name); empty for the default action

    @property
    def text(self) -> str:
        """The reason as the operator reads it (and as it goes on the wire): the policy first, if any."""
        return f"{DENIED_POLICY_PREFIX}{self.policy}: {self.reason}" if self.policy else self.reason


def _address_tlv(tlv_type: int, ip: str, port: int) -> bytes:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    address = ipaddress.ip_address(ip)
    af = AF_INET4 if address.version == 4 else AF_INET6
    packed = address.packed
    return bytes([tlv_type, 1 + len(packed) + 2, af]) + packed + struct.pack("!H", port)


def _decode_address(name: str, value: bytes) -> tuple[str, int]:
    size = {AF_INET4: 4, AF_INET6: 16}.get(value[0] if value else -1)
    if size is None or len(value) != 1 + size + 2:
        raise PeerProtocolError(f"{name} TLV must be af=4 with 4 address bytes or af=6 with 16, then 2 port bytes")
    port = struct.unpack("!H", value[1 + size:])[0]
    if port == 0:
        raise PeerProtocolError(f"{name} TLV carries port 0")
    raw = value[1:1 + size]
    return str(ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)), port


def encode_connect_body(request: ConnectionFacts) -> bytes:
    """The TLV body of a CONNECT (also the payload of a tcpmesh/2 OPEN frame)."""
    body = _address_tlv(TLV_DEST, request.destination_ip, request.destination_port)
    if request.source_ip:
        body += _address_tlv(TLV_SOURCE, request.source_ip, request.source_port)
    process = request.process
    if process is not None:
        comm = process.comm.encode("utf-8", "replace")[:COMM_MAX]
        body += bytes([TLV_CLIENT_PROCESS, 8 + len(comm)]) + struct.pack("!II", process.pid, process.uid) + comm
    if request.service:
        service = request.service.encode("utf-8")
        if len(service) > SERVICE_MAX:
            raise ValueError(f"service name of {len(service)} bytes exceeds {SERVICE_MAX}")
        body += bytes([TLV_SERVICE, len(service)]) + service
    if request.flow_id:
        if len(request.flow_id) != FLOW_ID_LEN:
            raise ValueError(f"flow id must be {FLOW_ID_LEN} bytes")
        body += bytes([TLV_FLOW_ID, FLOW_ID_LEN]) + request.flow_id
    if len(body) > MAX_BODY:
        raise ValueError(f"CONNECT body of {len(body)} bytes exceeds {MAX_BODY}")
    return body


def encode_status_body(reply: StatusReply) -> bytes:
    """status:u8 + reason (also the payload of a tcpmesh/2 STATUS frame)."""
    return bytes([int(reply.status)]) + reply.text.encode("utf-8", "replace")[:MAX_REASON]


def decode_connect_body(body: bytes) -> ConnectionFacts:
    if len(body) > MAX_BODY:
        raise PeerProtocolError(f"CONNECT body of {len(body)} bytes exceeds the limit of {MAX_BODY}")
    return _decode_connect(body)


def decode_status_body(body: bytes) -> StatusReply:
    return _decode_status(body)


def _decode_connect(body: bytes) -> ConnectionFacts:
    dest: tuple[str, int] | None = None
    source: tuple[str, int] = ("", 0)
    process: ClientProcess | None = None
    flow_id = b""
    service = ""
    offset = 0
    while offset < len(body):
        if offset + 2 > len(body):
            raise PeerProtocolError("truncated TLV in CONNECT")
        tlv_type, tlv_len = body[offset], body[offset + 1]
        value = body[offset + 2:offset + 2 + tlv_len]
        if len(value) != tlv_len:
            raise PeerProtocolError(f"TLV {tlv_type} claims {tlv_len} bytes, {len(value)} present")
        offset += 2 + tlv_len
        if tlv_type == TLV_DEST:
            dest = _decode_address("DEST", value)
        elif tlv_type == TLV_SOURCE:
            source = _decode_address("SOURCE", value)
        elif tlv_type == TLV_CLIENT_PROCESS:
            if not 8 <= tlv_len <= 8 + COMM_MAX:
                raise PeerProtocolError(f"CLIENT_PROCESS TLV of {tlv_len} bytes (8 to {8 + COMM_MAX})")
            pid, uid = struct.unpack("!II", value[:8])
            process = ClientProcess(pid, uid, value[8:].decode("utf-8", "replace"))
        elif tlv_type == TLV_SERVICE:
            if not 0 < tlv_len <= SERVICE_MAX:
                raise PeerProtocolError(f"SERVICE TLV of {tlv_len} bytes (1 to {SERVICE_MAX})")
            service = value.decode("utf-8", "replace")
        elif tlv_type == TLV_FLOW_ID:
            if tlv_len != FLOW_ID_LEN:
                raise PeerProtocolError(f"FLOW_ID TLV must be {FLOW_ID_LEN} bytes")
            flow_id = value
        elif tlv_type & TLV_CRITICAL:
            raise PeerProtocolError(f"unknown critical TLV type {tlv_type}")
    if dest is None:
        raise PeerProtocolError("CONNECT without a DEST TLV")
    return ConnectionFacts(dest[0], dest[1], flow_id, source[0], source[1], process, service=service)


def _decode_status(body: bytes) -> StatusReply:
    if not body:
        raise PeerProtocolError("empty STATUS body")
    try:
        status = Status(body[0])
    except ValueError as exc:
        raise PeerProtocolError(f"unknown status code {body[0]}") from exc
    if len(body) - 1 > MAX_REASON:
        raise PeerProtocolError("STATUS reason too long")
    reason = body[1:].decode("utf-8", "replace")
    if status is Status.DENIED and reason.startswith(DENIED_POLICY_PREFIX) and ": " in reason:
        policy, rest = reason[len(DENIED_POLICY_PREFIX):].split(": ", 1)
        if policy and " " not in policy:
            return StatusReply(status, rest, policy)
    return StatusReply(status, reason)
