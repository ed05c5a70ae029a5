"""Dual stack outside the kernel (issue #14 item 4): the registry's ip6, the tunnel header's IPv6
DEST, the lab's IPv6 address plan."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.lab.topology import plan_lab
from agent.connection.facts import ConnectionFacts
from agent.proxy.header import PeerProtocolError, decode_connect_body, encode_connect_body
from agent.registry.static_file import parse_registry


def registry(**extra):
    return {"nodes": [{"name": "node1", "address": "10.76.0.1"}],
            "workloads": [{"name": "a", "namespace": "lab", "service_account": "a", "ip": "10.77.1.11",
                           "node": "node1", **extra}]}


def test_a_workload_is_found_by_either_address_and_ip6_is_canonical():
    reg = parse_registry(registry(ip6="FD00:77:1:0::11"), "td")
    assert reg.workloads[0].ip6 == "fd00:77:1::11"
    assert reg.by_ip("fd00:77:1::11") is reg.by_ip("10.77.1.11") is reg.workloads[0]


@pytest.mark.parametrize("value", ["10.77.1.12", "not-an-ip", 6])
def test_ip6_must_be_an_ipv6_address(value):
    with pytest.raises(ConfigError, match=r"workloads\[0\].ip6"):
        parse_registry(registry(ip6=value), "td")


def test_no_address_twice_across_families():
    doc = registry(ip6="fd00:77:1::11")
    doc["workloads"].append({"name": "b", "namespace": "lab", "service_account": "b", "ip": "10.77.1.12",
                             "node": "node1", "ip6": "fd00:77:1::11"})
    with pytest.raises(ConfigError, match="duplicate"):
        parse_registry(doc, "td")


def test_the_tunnel_header_carries_an_ipv6_destination():
    body = encode_connect_body(ConnectionFacts(destination_ip="fd00:77:2::11", destination_port=6379,
                                               source_ip="10.77.1.11", source_port=40000))
    got = decode_connect_body(body)
    assert (got.destination_ip, got.destination_port, got.source_ip) == ("fd00:77:2::11", 6379, "10.77.1.11")
    with pytest.raises(PeerProtocolError, match="af=6 with 16"):
        decode_connect_body(bytes([1, 10, 6]) + bytes(9))  # af 6 but 7 address bytes


def test_the_lab_gives_every_pod_and_node_an_ipv6_address():
    plan = plan_lab("x", 2, 2, cgroup_root="/sys/fs/cgroup")
    assert [p.ip6 for p in plan.pods] == ["fd00:77:1::11", "fd00:77:1::12", "fd00:77:2::11", "fd00:77:2::12"]
    assert plan.node("node1").wire_address6 == "fd00:76::1"
    assert plan.node("node1").routes6 == (("fd00:77:2::/64", "fd00:76::2"),)
