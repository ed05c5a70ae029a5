"""The destinations in the mesh as LPM keys (agent.capture.meshdsts): what the connect hooks decide."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from agent.capture import abi
from agent.capture.egress import parse_event
from agent.capture.meshdsts import CAPTURE_EVERYTHING, destination, in_mesh, lookup, mesh_entries
from agent.errors import ConfigError


def test_workload_addresses_of_both_families_are_in_the_mesh_on_every_port():
    entries = mesh_entries([destination("10.77.1.11"), destination("fd00:77:1::11")])
    assert in_mesh(entries, "10.77.1.11", 5432) and in_mesh(entries, "10.77.1.11", 1)
    assert in_mesh(entries, "fd00:77:1::11", 6379)
    assert not in_mesh(entries, "10.77.1.12", 5432) and not in_mesh(entries, "fd00:77:1::12", 6379)
    assert not in_mesh(entries, "::ffff:10.77.1.11", 5432)  # the families never mix


def test_longest_entry_wins_address_and_port_before_address_before_prefix():
    entries = mesh_entries([destination("10.96.0.0/12"), destination("10.96.0.10", kind=abi.DST_OUTSIDE),
                            destination("10.96.0.10", 53, abi.DST_SERVICE)])
    assert lookup(entries, "10.97.1.1", 80) == abi.DST_WORKLOAD
    assert lookup(entries, "10.96.0.10", 80) == abi.DST_OUTSIDE
    assert lookup(entries, "10.96.0.10", 53) == abi.DST_SERVICE
    assert lookup(entries, "192.0.2.1", 80) is None


def test_key_layout_prefix_lengths():
    assert abi.dst_key(ipaddress.ip_network("10.0.0.0/8")).prefixlen == 32 + 8
    assert abi.dst_key(ipaddress.ip_network("10.0.0.1/32")).prefixlen == abi.DST_ADDR_BITS
    assert abi.dst_key(ipaddress.ip_network("fd00::/8")).prefixlen == 32 + 8
    key = abi.dst_key(ipaddress.ip_network("10.0.0.1/32"), 5432)
    assert key.prefixlen == abi.DST_KEY_BITS and key.family == abi.DST_INET and list(key.addr)[1:] == [0, 0, 0]


def test_capture_everything_covers_both_families():
    entries = mesh_entries(CAPTURE_EVERYTHING)
    assert in_mesh(entries, "192.0.2.1", 443) and in_mesh(entries, "2001:db8::1", 443)


@pytest.mark.parametrize("address, port", [("10.0.0.1/8", None), ("not-an-ip", None), ("10.0.0.0/8", 53),
                                           ("10.0.0.1", 0)])
def test_bad_destinations_name_the_value(address, port):
    with pytest.raises(ConfigError, match="mesh destination"):
        destination(address, port)


def test_egress_event_parses_and_short_records_are_refused():
    event = abi.EgressEvent(cgroup_id=7, pid=42, uid=1000, port=abi.port_to_net_u16(443), family=abi.DST_INET,
                            denied=1, comm=b"curl")
    event.addr[0] = abi.ip4_to_net_u32("192.0.2.1")
    parsed = parse_event(bytes(event))
    assert (parsed.destination_ip, parsed.destination_port, parsed.denied, parsed.comm, parsed.pid) == \
        ("192.0.2.1", 443, True, "curl", 42)
    six = abi.EgressEvent(family=abi.DST_INET6, port=abi.port_to_net_u16(80))
    six.addr[:] = list(struct.unpack("=4I", ipaddress.IPv6Address("2001:db8::5").packed))
    assert parse_event(bytes(six)).destination_ip == "2001:db8::5"
    assert parse_event(b"\0" * 10) is None


def test_packet_level_modes_capture_each_ipv4_workload_inside_the_configured_scope():
    from agent.capture.meshdsts import ipv4_mesh_cidrs

    addresses = ["10.77.2.10", "10.77.1.10", "fd00::10", "10.77.9.9", "192.0.2.1", "10.77.1.10"]
    assert ipv4_mesh_cidrs(addresses, ["10.77.0.0/16"], ["10.77.9.0/24"]) == ["10.77.1.10/32", "10.77.2.10/32"]
    assert ipv4_mesh_cidrs([], ["0.0.0.0/0"]) == []
