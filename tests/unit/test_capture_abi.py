"""The ctypes mirror's own invariants and byte-order helpers (the C comparison is in tests/bpf)."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket

import pytest

from hypothesis import given
from hypothesis import strategies as st

from agent.capture import abi


def test_struct_sizes_have_no_implicit_padding():
    for mirror in abi.STRUCTS.values():
        covered = sum(ctypes.sizeof(ftype) for _, ftype in mirror._fields_)
        assert covered == ctypes.sizeof(mirror), mirror


def test_reason_codes_are_dense_and_unique():
    assert len(set(abi.REASONS)) == len(abi.REASONS) == abi.REASON_MAX
    assert abi.REASON_CODES["captured"] == 0
    assert abi.C_CONSTANTS["TCPMESH_R_ORIGIN_MISSING"] == abi.REASON_CODES["origin_missing"]


def test_the_kernel_itself_knows_no_such_option():
    """Only the getsockopt hook may answer SO_ORIGIN: asked on a socket no hook sees, the kernel must
    refuse it as an option it does not have (ENOPROTOOPT) — not answer it, not ENOENT as for
    SO_ORIGINAL_DST — so a clash with a kernel option would show here. The same bytes of the C header
    are checked against this mirror in tests/bpf/test_abi_layout.py."""
    with socket.socket() as sock:
        with pytest.raises(OSError) as refused:
            sock.getsockopt(socket.IPPROTO_IP, abi.SO_ORIGIN, ctypes.sizeof(abi.STRUCTS["tcpmesh_origin"]))
    assert refused.value.errno == errno.ENOPROTOOPT, refused.value


@given(st.ip_addresses(v=4).map(str))
def test_ip_roundtrip(ip):
    assert abi.net_u32_to_ip4(abi.ip4_to_net_u32(ip)) == ip


@given(st.integers(0, 65535))
def test_port_roundtrip(port):
    assert abi.net_u16_to_port(abi.port_to_net_u16(port)) == port


def test_keys_are_in_network_order():
    key = abi.peer_key("10.200.1.2", 40000, client_seq=0x01020304, server_seq=7)
    assert bytes(key)[:8] == bytes([10, 200, 1, 2]) + (40000).to_bytes(2, "big") + b"\0\0"
    assert key.client_seq == 0x01020304 and key.server_seq == 7  # sequence numbers: host order
    ck = abi.cidr_key(ipaddress.IPv4Network("10.77.0.0/16"))
    assert ck.prefixlen == 16  # host order, as struct bpf_lpm_trie_key wants
    assert bytes(ck)[4:] == bytes([10, 77, 0, 0])


def test_map_names_stay_distinct_in_the_kernel():
    """The kernel keeps 15 characters of a map name; bpftool must still tell ours apart."""
    assert all(name.startswith("tcpmesh_") for name in abi.MAPS)
    assert len({name[:15] for name in abi.MAPS}) == len(abi.MAPS)
