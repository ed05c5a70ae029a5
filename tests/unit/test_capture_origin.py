"""parse_origin / parse_original_dst / read_origin without root: bytes built from the ctypes mirror."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.capture import abi
from agent.capture.origin import (ORIGIN_SIZE, Origin, OriginFormatError, parse_origin, parse_original_dst,
                                  read_origin, read_original_dst)

ipv4 = st.ip_addresses(v=4).map(str)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
comm = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=15)


def record(ip="10.77.2.10", port=5432, pid=42, uid=1000, cgroup_id=7, cookie=99, comm_=b"psql", version=abi.ABI_VERSION):
    return bytes(abi.OriginStruct(dst_ip4=abi.ip4_to_net_u32(ip), dst_port=abi.port_to_net_u16(port),
                                  version=version, pid=pid, uid=uid, cgroup_id=cgroup_id, cookie=cookie,
                                  comm=comm_))


def test_wire_layout_is_network_order_for_address_and_port():
    raw = record()
    assert raw[0:4] == socket.inet_aton("10.77.2.10")
    assert raw[4:6] == struct.pack("!H", 5432)
    assert len(raw) == ORIGIN_SIZE == 64
    assert raw[48:64] == bytes(16)  # dst_ip6: all zero for an IPv4 destination


def test_an_ipv6_record_names_its_ipv6_destination():
    rec = abi.OriginStruct(dst_ip4=0, dst_port=abi.port_to_net_u16(6379), version=abi.ABI_VERSION, pid=1, comm=b"x")
    rec.dst_ip6[:] = list(struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, "fd00:77:2::11")))
    assert (parse_origin(bytes(rec)).dst_ip, parse_origin(bytes(rec)).dst_port) == ("fd00:77:2::11", 6379)


@given(ip=ipv4, port=st.integers(0, 65535), pid=u32, uid=u32, cgroup_id=u64, cookie=u64, name=comm)
def test_parse_origin_roundtrip(ip, port, pid, uid, cgroup_id, cookie, name):
    got = parse_origin(record(ip, port, pid, uid, cgroup_id, cookie, name.encode()))
    assert got == Origin(ip, port, pid, uid, cgroup_id, cookie, name)


def test_full_length_comm_without_nul():
    assert parse_origin(record(comm_=b"a" * 16)).comm == "a" * 16


@pytest.mark.parametrize("raw", [b"", b"\0" * 47, b"\0" * 49])
def test_wrong_size_is_rejected(raw):
    with pytest.raises(OriginFormatError, match="bytes"):
        parse_origin(raw)


@pytest.mark.parametrize("other", [abi.ABI_VERSION + 1, abi.ORIGIN_LAYOUT_SINCE - 1, 0])
def test_other_abi_version_is_rejected_with_a_hint(other):
    with pytest.raises(OriginFormatError, match=f"ABI version {other},"):
        parse_origin(record(version=other))


def test_a_record_of_a_previous_abi_is_read():
    """During an upgrade from ABI 3-5 the previous set's getsockopt hook may answer for a connection
    it captured: its 48-byte IPv4 record must not cost the connection; a 64-byte one of those
    versions, or a 48-byte one of this version, is refused."""
    for version in range(abi.ORIGIN_LEGACY_SINCE, abi.ORIGIN_LAYOUT_SINCE):
        origin = parse_origin(record(version=version, port=6379)[:abi.ORIGIN_LEGACY_SIZE])
        assert (origin.dst_ip, origin.dst_port) == ("10.77.2.10", 6379)
    with pytest.raises(OriginFormatError, match="version"):
        parse_origin(record(version=abi.ORIGIN_LAYOUT_SINCE - 1))
    with pytest.raises(OriginFormatError, match="version"):
        parse_origin(record()[:abi.ORIGIN_LEGACY_SIZE])


def test_parse_original_dst():
    sa = bytes(abi.SockaddrIn(family=abi.AF_INET, port=abi.port_to_net_u16(443), addr=abi.ip4_to_net_u32("1.2.3.4")))
    assert parse_original_dst(sa) == ("1.2.3.4", 443)
    with pytest.raises(OriginFormatError, match="family"):
        parse_original_dst(b"\x0a\x00" + sa[2:])
    with pytest.raises(OriginFormatError):
        parse_original_dst(sa[:8])


class FakeSocket:
    def __init__(self, answer=None, err=None):
        self.answer, self.err, self.calls = answer, err, []

    def getsockopt(self, level, optname, buflen):
        self.calls.append((level, optname, buflen))
        if self.err is not None:
            raise OSError(self.err, "fake")
        return self.answer


def test_read_origin_makes_one_call_with_the_abi_option():
    sock = FakeSocket(answer=record())
    assert read_origin(sock).dst_port == 5432
    assert sock.calls == [(0, 0x746D, 64)]


@pytest.mark.parametrize("err", [errno.ENOPROTOOPT, errno.ENOENT])
def test_no_record_is_none(err):
    assert read_origin(FakeSocket(err=err)) is None
    assert read_original_dst(FakeSocket(err=err)) is None


def test_other_errors_propagate():
    with pytest.raises(OSError):
        read_origin(FakeSocket(err=errno.EBADF))


def test_read_origin_on_a_real_uncaptured_socket_is_none():
    """Without the hook the kernel answers ENOPROTOOPT (or ENOENT from conntrack): None, no error."""
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()):
        conn, _ = srv.accept()
        with conn:
            assert read_origin(conn) is None
            assert read_original_dst(conn) is None
