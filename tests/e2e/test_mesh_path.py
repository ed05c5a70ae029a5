"""End to end on the lab: pods on node1 reach a pod on node2 through both agents, with mTLS on the
wire, intact bytes both ways, half-close, attribution and metrics on both nodes. The lab routes pods
directly, so each data test also proves the path (tests/e2e/mesh_witness.py): the flow on both nodes,
mutual_tls, exact byte counts, counters moved by exactly one connection."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from agent.lab.sniff import PacketCapture
from tests.e2e.mesh_witness import expect_through_both_agents, reading

INBOUND_PORT = 15008
MIB = 1024 * 1024


def principal(lab, pod: str) -> str:
    return lab.pod(pod).spiffe_id


def test_16_mib_of_random_bytes_arrive_intact_both_ways(mesh_lab):
    mesh_lab.start_server("n2p1", 7001, "echo")
    server = mesh_lab.pod("n2p1")
    before = reading(mesh_lab, "n1p1", "n2p1")
    result = mesh_lab.run_client("n1p1", f"{server.ip}:7001", 16 * MIB, "echo")
    assert result.get("error") is None, result
    assert result["complete"]
    assert result["received"] == result["sent"] == 16 * MIB
    assert result["received_sha256"] == result["sent_sha256"]
    # the application still sees the peer it asked for, not the proxy
    assert result["peer"] == [server.ip, 7001]
    (flow,) = expect_through_both_agents(mesh_lab, before, "n1p1", "n2p1", connections=1, received=16 * MIB,
                                         sent=16 * MIB, flows=True)
    assert flow["destination_port"] == 7001


def test_half_close_lets_the_server_answer_after_the_client_is_done(mesh_lab):
    mesh_lab.start_server("n2p2", 7002, "digest")
    before = reading(mesh_lab, "n1p2", "n2p2")
    result = mesh_lab.run_client("n1p2", f"{mesh_lab.pod('n2p2').ip}:7002", 300_000, "digest")
    assert result["complete"], result
    digest, length = result["reply"].split()
    assert digest == result["sent_sha256"] and int(length) == 300_000
    # the answer came after the client's FIN, through both proxies: the half-close crossed the tunnel
    expect_through_both_agents(mesh_lab, before, "n1p2", "n2p2", connections=1, received=300_000,
                               sent=result["received"], flows=True)


def test_the_wire_carries_tls_and_never_the_plaintext(mesh_lab):
    mesh_lab.start_server("n2p1", 7003, "echo")
    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}"
    node1 = mesh_lab.node(1)
    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        result = mesh_lab.run_client("n1p1", f"{mesh_lab.pod('n2p1').ip}:7003", 64 * 1024, "echo", marker=marker)
    assert result["complete"] and result["received_sha256"] == result["sent_sha256"]
    segments = capture.tcp_segments()
    tunnel = [s for s in segments if INBOUND_PORT in (s.sport, s.dport) and s.payload]
    assert tunnel, "no tunnel traffic captured on node1's wire interface"
    to_server = b"".join(s.payload for s in tunnel if s.dport == INBOUND_PORT)
    assert b"\x17\x03\x03" in to_server, "no TLS application-data records on the wire"
    # tunnels are pooled: a tunnel opened during the capture must start with a TLS handshake
    new_tunnels = {s.sport for s in segments if s.dport == INBOUND_PORT and s.flags & 0x02}
    for port in new_tunnels:
        first = next(s.payload for s in tunnel if s.sport == port)
        assert first[:1] == b"\x16", "a new tunnel does not start with a TLS handshake record"
    everything = b"".join(s.payload for s in segments)
    assert marker.encode() not in everything
    assert not any(s.dport == 7003 or s.sport == 7003 for s in segments), "plaintext port seen on the wire"


def test_both_nodes_attribute_the_flow_and_count_it(mesh_lab):
    mesh_lab.start_server("n2p1", 7004, "digest")
    result = mesh_lab.run_client("n1p1", f"{mesh_lab.pod('n2p1').ip}:7004", 12345, "digest", name="e2e-attrib")
    assert result["complete"], result
    src = mesh_lab.wait_flow(1, lambda f: f["destination_port"] == 7004)
    dst = mesh_lab.wait_flow(2, lambda f: f["flow_id"] == src["flow_id"])
    if mesh_lab.capture_mode == "ebpf-connect":  # the connect4 hook runs in the client process
        assert src["pid"] == result["started_pid"] and src["comm"] == "e2e-attrib"
    else:  # ebpf-tc and iptables see packets, not processes: pid and comm are unknown, the pod is not
        assert src["pid"] is None and src["comm"] is None
        assert src["source_ip"] == mesh_lab.pod("n1p1").ip and src["source_workload"] == "n1p1"
    assert src["source_principal"] == dst["source_principal"] == principal(mesh_lab, "n1p1")
    assert src["destination_principal"] == dst["destination_principal"] == principal(mesh_lab, "n2p1")
    assert src["bytes_received"] == dst["bytes_received"] == 12345
    assert src["response_flags"] == dst["response_flags"] == "-"

    expected = {"source_workload": "n1p1", "source_workload_namespace": "lab",
                "source_principal": principal(mesh_lab, "n1p1"), "destination_workload": "n2p1",
                "destination_workload_namespace": "lab", "destination_principal": principal(mesh_lab, "n2p1"),
                "connection_security_policy": "mutual_tls", "response_flags": "-",
                # dialled by pod address, not through a Service: Istio's value for "no Service"
                "destination_service": "unknown", "destination_service_name": "unknown",
                "destination_service_namespace": "unknown"}
    for node, reporter in ((1, "source"), (2, "destination")):
        text = mesh_lab.admin_get(node, "/metrics").decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        labels = tuple(sorted({**expected, "reporter": reporter}.items()))
        for metric in ("tcpmesh_tcp_connections_opened_total", "tcpmesh_tcp_connections_closed_total",
                       "tcpmesh_tcp_received_bytes_total", "tcpmesh_tcp_sent_bytes_total"):
            assert samples.get((metric, labels), 0) > 0, f"node{node} has no {metric} with {dict(labels)}"
        assert "10.77." not in "".join(l for l in text.splitlines() if l.startswith("tcpmesh_tcp_")), \
            "metric labels must not carry addresses"


def test_the_agents_relay_with_the_data_path_they_report(mesh_lab):
    """The lab's agents run the compiled hot path when `make setup` built it (agent.proxy.hotpath), the
    pure-Python reference under TCPMESH_HOTPATH=python (.ci/run's second job): each says which at start,
    and the bytes above crossed through it."""
    from agent.proxy import hotpath

    expected = f"tunnel data path: {hotpath.describe()}"
    for index in (1, 2):
        with open(mesh_lab.node(index).log_file, encoding="utf-8", errors="replace") as log:
            text = log.read()
        assert expected in text, f"node{index}'s agent does not say `{expected}`:\n{text[-2000:]}"
