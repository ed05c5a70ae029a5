"""agent.telemetry.refusals and the node table's counting sets (agent.capture.node_rules): what an operator learns
of a connection the packet-level modes reset — the pod, the reason, the fix — with no address in a metric label."""

from __future__ import annotations

import json

from agent.capture.node_rules import parse_refusals
from agent.control.status import node_status
from agent.registry.model import Endpoint, Node, Registry, Service, ServicePort, Workload
from agent.telemetry.refusals import (HOST_PORT, IPV6, IPV6_OUTSIDE_MESH, NODE_PORT, RefusalReport, classify,
                                      increases)

TD = "rf.test"
WEB = Workload("web", "shop", "web", "10.77.1.11", "node1", trust_domain=TD, ip6="fd00:77:1::11")
DB = Workload("db", "shop", "db", "10.77.2.11", "node2", trust_domain=TD, ip6="fd00:77:2::11",
              host_ports=(ServicePort(31001, 5432),))
VAULT = Service("vault", "shop", ("10.96.0.50", "fd00:96::50"), (ServicePort(80, 8080), ServicePort(7415, 7415)),
                (Endpoint("shop/db"),), node_ports=(ServicePort(30761, 7415),))
REGISTRY = Registry.build(TD, [Node("node1", "10.76.0.1", ("fd00:76::1",)), Node("node2", "10.76.0.2")],
                          [WEB, DB], [VAULT])


def test_each_reset_is_named_by_its_reason_and_fix():
    node_port = classify(REGISTRY, "ebpf-tc", ("10.77.1.11", "10.76.0.2", 30761))
    assert (node_port.source, node_port.reason) == (WEB, NODE_PORT)
    assert node_port.what == "nodePort 30761 at 10.76.0.2 (Service shop/vault)"
    assert "10.96.0.50:7415" in node_port.fix and "capture.mode ebpf-connect" in node_port.fix
    host_port = classify(REGISTRY, "iptables", ("10.77.1.11", "10.76.0.2", 31001))
    assert (host_port.reason, host_port.what) == (HOST_PORT, "hostPort 31001 at 10.76.0.2 (pod shop/db)")
    assert "10.77.2.11:5432" in host_port.fix
    ipv6 = classify(REGISTRY, "ebpf-tc", ("fd00:77:1::11", "fd00:96::50", 7415))
    assert (ipv6.source, ipv6.reason) == (WEB, IPV6) and "IPv4 only" in ipv6.why
    assert classify(REGISTRY, "ebpf-tc", ("fd00:77:1::11", "fd00:77:2::11", 22)).reason == IPV6
    assert classify(REGISTRY, "ebpf-tc", ("fd00:77:1::11", "fd00:76::1", 30761)).reason == NODE_PORT
    outside = classify(REGISTRY, "ebpf-tc", ("fd00:77:1::11", "fd00:99::1", 443))
    assert outside.reason == IPV6_OUTSIDE_MESH and "outbound_passthrough" in outside.fix
    stranger = classify(REGISTRY, "ebpf-tc", ("10.77.1.99", "10.76.0.2", 30761))
    assert stranger.source is None and stranger.reason == NODE_PORT


def test_the_increase_since_the_last_read_and_a_count_that_started_again():
    last = {("a", "b", 1): 5, ("a", "b", 2): 3}
    assert increases(last, {("a", "b", 1): 7, ("a", "b", 2): 3, ("c", "b", 1): 1}) == {("a", "b", 1): 2, ("c", "b", 1): 1}
    assert increases(last, {("a", "b", 1): 2}) == {("a", "b", 1): 2}  # the element timed out and came back


def test_one_warning_per_pod_per_read_naming_the_port_why_and_fix_and_a_count_per_reason(caplog):
    counted = []
    report = RefusalReport("ebpf-tc", lambda: REGISTRY, lambda refusal, n: counted.append(
        (refusal.source.key if refusal.source else None, refusal.reason, n)))
    with caplog.at_level("WARNING", logger="tcpmesh.telemetry"):
        report.on_counts({("10.77.1.11", "10.76.0.2", 30761): 2, ("10.77.1.11", "10.76.0.2", 31001): 1}, 10, now=100)
        report.on_counts({("10.77.1.11", "10.76.0.2", 30761): 2, ("10.77.1.11", "10.76.0.2", 31001): 1}, 10, now=110)
    assert sorted(counted) == [("shop/web", HOST_PORT, 1), ("shop/web", NODE_PORT, 2)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # nothing new in the second read: nothing said
    line = lines[0]
    assert line.startswith("capture mode ebpf-tc reset 3 connection(s) from pod shop/web (10.77.1.11) in the last 10s")
    assert "nodePort 30761 at 10.76.0.2 (Service shop/vault) x2" in line and "hostPort 31001" in line
    assert "Fix: dial the Service at 10.96.0.50:7415" in line and "ebpf-connect" in line
    status = node_status(node="node1", now=130, ready=True, not_ready_reason="", capture_mode="ebpf-tc", workloads=[],
                         identities=[], policy={}, registry={}, issuer=None, refused=list(report.recent.values()))
    assert any(p.startswith("shop/web: 3 connection(s) reset by the node's table 30s ago (nodePort 30761")
               for p in status["problems"]), status["problems"]
    report.retain({"shop/db"})
    assert report.recent == {}


def test_the_kernels_counts_are_read_from_nfts_listing():
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {
        "family": "inet", "name": "refused4", "table": "tcpmesh_node", "flags": ["timeout"], "elem": [
            {"elem": {"val": {"concat": ["10.77.1.12", "10.76.0.2", 30761]}, "expires": 599,
                      "counter": {"packets": 3, "bytes": 180}}}]}}]}
    assert parse_refusals(json.dumps(listing)) == {("10.77.1.12", "10.76.0.2", 30761): 3}
    empty = {"nftables": [{"set": {"family": "inet", "name": "refused6", "table": "tcpmesh_node"}}]}
    assert parse_refusals(json.dumps(empty)) == {}


def test_a_flood_of_sources_is_named_twenty_at_a_time_and_forgotten_after_ten_minutes(caplog):
    report = RefusalReport("iptables", lambda: REGISTRY, lambda refusal, n: None)
    flood = {(f"10.99.0.{i}", "10.76.0.2", 30761): 1 for i in range(1, 101)}  # spoofed sources, no workload
    with caplog.at_level("WARNING", logger="tcpmesh.telemetry"):
        report.on_counts(flood, 10, now=0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 21 and "80 more source(s)" in lines[0], lines[0]
    assert len(report.recent) == 20
    report.on_counts(flood, 10, now=601)
    assert report.recent == {}
