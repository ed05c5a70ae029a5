"""parse_tcp reads IPv4/TCP out of Ethernet frames and ignores everything else."""

import socket
import struct

from agent.lab.sniff import parse_tcp


def _frame(payload: bytes, ethertype: int = 0x0800, proto: int = 6) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 15008, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, proto, 0,
                     socket.inet_aton("10.76.0.1"), socket.inet_aton("10.76.0.2"))
    return b"\xff" * 12 + struct.pack("!H", ethertype) + ip + tcp + b"\x00" * 4  # trailing Ethernet padding


def test_parses_tcp_segment():
    seg = parse_tcp(_frame(b"hello"))
    assert (seg.src, seg.dst, seg.sport, seg.dport, seg.flags, seg.payload) == \
        ("10.76.0.1", "10.76.0.2", 40000, 15008, 0x18, b"hello")


def test_ignores_non_ip_and_non_tcp():
    assert parse_tcp(_frame(b"x", ethertype=0x0806)) is None
    assert parse_tcp(_frame(b"x", proto=17)) is None
    assert parse_tcp(b"short") is None
