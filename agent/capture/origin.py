"""Reading a captured connection's original destination and client from the proxy's accepted socket.

``parse_origin`` and ``parse_original_dst`` are pure (bytes in, values out). ``read_origin`` and
``read_original_dst`` make exactly one getsockopt call each; the answer comes from the
cgroup/getsockopt hook that ConnectCapture.attach_proxy() put on the proxy's cgroup. A captured
connection's record answers once (the hook deletes it with its answer): call one of them, once,
per accepted socket — ``read_origin`` has everything.
Imports no bcc: the proxy needs only a socket.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from dataclasses import dataclass

from agent.capture import abi

ORIGIN_SIZE = ctypes.sizeof(abi.OriginStruct)
SOCKADDR_IN_SIZE = ctypes.sizeof(abi.SockaddrIn)

# errnos that mean "no record for this socket" rather than a fault: the kernel's own answer for
# these options (ENOPROTOOPT; ENOENT from conntrack for SO_ORIGINAL_DST), left as is by the hook.
NO_RECORD_ERRNOS = frozenset({errno.ENOPROTOOPT, errno.ENOENT})


class OriginFormatError(ValueError):
    """The getsockopt answer is not a struct tcpmesh_origin of this ABI version."""


@dataclass(frozen=True)
class Origin:
    dst_ip: str
    dst_port: int
    pid: int
    uid: int
    cgroup_id: int
    cookie: int
    comm: str


def parse_origin(raw: bytes) -> Origin:
    """Decode a struct tcpmesh_origin (TCPMESH_SO_ORIGIN answer or a tcpmesh_*_origin map value).

    Records of every ABI version with this layout are accepted (abi.ORIGIN_LAYOUT_SINCE on), and the
    48-byte IPv4-only records of the versions before it (abi.ORIGIN_LEGACY_SINCE on): during an
    upgrade the previous program set's getsockopt hook may answer for a connection it captured."""
    if len(raw) == abi.ORIGIN_LEGACY_SIZE:
        raw, versions = raw + bytes(ORIGIN_SIZE - len(raw)), (abi.ORIGIN_LEGACY_SINCE, abi.ORIGIN_LAYOUT_SINCE - 1)
    elif len(raw) == ORIGIN_SIZE:
        versions = (abi.ORIGIN_LAYOUT_SINCE, abi.ABI_VERSION)
    else:
        raise OriginFormatError(f"origin record is {len(raw)} bytes, expected {ORIGIN_SIZE} "
                                f"(or {abi.ORIGIN_LEGACY_SIZE} before ABI {abi.ORIGIN_LAYOUT_SINCE})")
    rec = abi.OriginStruct.from_buffer_copy(raw)
    if not versions[0] <= rec.version <= versions[1]:
        raise OriginFormatError(f"origin record of {len(raw)} bytes has ABI version {rec.version}, this agent "
                                f"speaks {abi.ABI_VERSION} (records of {abi.ORIGIN_LEGACY_SINCE}..{abi.ABI_VERSION}): "
                                "the loaded BPF programs and the agent differ")
    return Origin(
        dst_ip=abi.origin_destination(rec),
        dst_port=abi.net_u16_to_port(rec.dst_port),
        pid=rec.pid,
        uid=rec.uid,
        cgroup_id=rec.cgroup_id,
        cookie=rec.cookie,
        comm=rec.comm.decode("utf-8", errors="replace"),  # ctypes c_char array stops at the first NUL
    )


def parse_original_dst(raw: bytes) -> tuple[str, int]:
    """Decode a struct sockaddr_in as SO_ORIGINAL_DST returns it."""
    if len(raw) < SOCKADDR_IN_SIZE:
        raise OriginFormatError(f"SO_ORIGINAL_DST answer is {len(raw)} bytes, expected {SOCKADDR_IN_SIZE}")
    sa = abi.SockaddrIn.from_buffer_copy(raw[:SOCKADDR_IN_SIZE])
    if sa.family != abi.AF_INET:
        raise OriginFormatError(f"SO_ORIGINAL_DST answer has address family {sa.family}, expected AF_INET")
    return abi.net_u32_to_ip4(sa.addr), abi.net_u16_to_port(sa.port)


def read_origin(sock: socket.socket) -> Origin | None:
    """The capture record of an accepted connection, or None when there is none."""
    try:
        raw = sock.getsockopt(abi.SOL_IP, abi.SO_ORIGIN, ORIGIN_SIZE)
    except OSError as exc:
        if exc.errno in NO_RECORD_ERRNOS:
            return None
        raise
    return parse_origin(raw)


def read_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """(ip, port) the client asked for, via SO_ORIGINAL_DST; None when there is no record."""
    try:
        raw = sock.getsockopt(abi.SOL_IP, abi.SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError as exc:
        if exc.errno in NO_RECORD_ERRNOS:
            return None
        raise
    return parse_original_dst(raw)
