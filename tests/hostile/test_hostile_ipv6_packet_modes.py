"""Attack: IPv6 around the packet-level capture modes (ebpf-tc, iptables) on a dual-stack node.

Those modes steer IPv4 packets only. On a dual-stack node — every lab pod has an IPv6 address, a
Service an IPv6 virtual address that the node's kube-proxy DNATs to the endpoint's IPv6 address — a
pod whose IPv4 is meshed dials the same workload over IPv6, directly or through the Service's IPv6
address. The promise (docs/security.md: "an address family the mesh does not carry — the
connection is refused"): never plaintext, never past a DENY. Seen failing on main in both modes
(the denied pod read the server over IPv6, directly and through the Service); held since
agent/capture/node_rules.py resets such SYNs on the client's node. And the IPv4 Service address,
which the same kube-proxy DNATed under the proxy's socket, so that its handshake never completed
(ebpf-tc: timeout, iptables: reset, nothing recorded; seen failing), is meshed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.capture import node_rules, tc_mode, tproxy_mode
from agent.capture.node_rules import TABLE
from agent.lab import lab as labops
from agent.lab.nsenter import socket_in_netns
from agent.lab.services import lab_service_set, service_document
from agent.lab.sniff import PacketCapture
from agent.lab.topology import POD_GATEWAY
from tests.hostile.test_hostile_services_ipv6 import dial, eventually, vault_lab

PORT = 7415
VAULT = ("10.96.0.50", "fd00:96::50")
OUTSIDE_PORT = 7416  # a listener in node2's netns: outside the mesh
NODE_PORT = 30761


@pytest.fixture(scope="module", params=["ebpf-tc", "iptables"])
def packet_lab(request, bpf_capable):
    with vault_lab("h7", "h7.tcpmesh", request.param, PORT, VAULT, node_port=NODE_PORT) as lab:
        yield lab


@pytest.mark.parametrize("pod", ["n1p2", "n1p1"], ids=["denied", "allowed"])
@pytest.mark.parametrize("target", ["pod-ipv6", "service-ipv6"])
def test_a_pod_does_not_reach_a_workload_over_ipv6_in_plaintext(packet_lab, target, pod):
    """Seen succeeding before agent/capture/node_rules.py: the server answered the denied pod over
    IPv6, from the client's own IPv6 address, and nothing was recorded. Now the SYN is reset on the
    client's node — at once (ECONNREFUSED), for the allowed pod as well: this mode does not carry IPv6."""
    lab = packet_lab
    address = lab.pod("n2p1").ip6 if target == "pod-ipv6" else VAULT[1]
    marker = f"V6-AROUND-{lab.capture_mode}-{uuid.uuid4().hex}"
    node1 = lab.node(1)
    with PacketCapture(node1.netns, node1.wire_ifname) as wire:
        attack = dial(lab, pod, address, port=PORT, marker=marker)
        time.sleep(0.3)
    assert "secret" not in attack.get("got", ""), \
        f"{lab.capture_mode}: {pod} read the workload over IPv6 ({address}) in plaintext: {attack}"
    assert not any(marker.encode() in frame for frame in wire.frames), \
        f"{lab.capture_mode}: the IPv6 payload crossed the wire in plaintext"
    assert attack.get("error") == "ConnectionRefusedError", attack  # refused at once, never a hang


@pytest.mark.parametrize("pod", ["n1p2", "n1p1"], ids=["denied", "allowed"])
@pytest.mark.parametrize("where", ["other-node", "own-node", "its-pods-gateway", "other-node-ipv6"])
def test_a_pod_does_not_reach_a_node_port_in_plaintext(packet_lab, where, pod):
    """These modes steer whole addresses and cannot take one port of a node's; a nodePort was left to kube-proxy's
    DNAT — seen succeeding on main in both modes: the denied pod read the server at node2's address and at its own
    gateway, nothing recorded. Now a pod's SYN to any (node address, nodePort) is reset on its node, at once."""
    lab = packet_lab
    address = {"other-node": lab.node(2).wire_address, "own-node": lab.node(1).wire_address,
               "its-pods-gateway": POD_GATEWAY, "other-node-ipv6": lab.node(2).wire_address6}[where]
    attack = dial(lab, pod, address, port=NODE_PORT)
    assert "secret" not in attack.get("got", ""), \
        f"{lab.capture_mode}: {pod} read the workload at {address}:{NODE_PORT} in plaintext: {attack}"
    assert attack.get("error") == "ConnectionRefusedError", attack  # refused at once, never a hang


LATE_ADDRESS = "10.78.0.2"  # in no registry: an address node1 gets after its agent is ready
FOLLOW_SECONDS = 3.0  # the agent re-applies within 1 s of the kernel's notice (docs/capture-modes.md); margin


@pytest.mark.parametrize("pod", ["n1p2", "n1p1"], ids=["denied", "allowed"])
def test_a_node_port_at_an_address_the_node_gets_later_is_refused(packet_lab, pod):
    """The node's addresses were read only when the registry changed. Seen succeeding on main in both modes: the
    denied pod read the server in plaintext at an address added to node1 after its agent started, nothing recorded.
    Now the agent follows rtnetlink's address notifications; the new (address, nodePort) is reset like the others."""
    lab = packet_lab
    netns = lab.node(1).netns
    eventually(lambda: dial(lab, pod, lab.node(1).wire_address, port=NODE_PORT).get("error") == "ConnectionRefusedError",
               "control: the registry's nodePort is not refused at node1's address yet")  # applied: no change after
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{LATE_ADDRESS}/32", "dev", "lo"], check=True)
    try:
        time.sleep(FOLLOW_SECONDS)
        attack = dial(lab, pod, LATE_ADDRESS, port=NODE_PORT)
    finally:
        subprocess.run(["ip", "-n", netns, "addr", "del", f"{LATE_ADDRESS}/32", "dev", "lo"], check=False)
    assert "secret" not in attack.get("got", ""), \
        f"{lab.capture_mode}: {pod} read the workload at {LATE_ADDRESS}:{NODE_PORT}, an address node1 got later: {attack}"
    assert attack.get("error") == "ConnectionRefusedError", attack


REFUSED = "tcpmesh_node_refused_connections_total{"
READ_SECONDS = 10.0  # how often the agent reads the node table's counts (agent/telemetry/refusals.py)


def test_a_refused_node_port_is_counted_per_pod_and_said_with_the_fix(packet_lab):
    """The node's table reset the SYN and nothing else knew: the operator saw only the pod's ECONNREFUSED. Seen on main
    in both modes: no metric and no log line named the pod, `tcpmesh status` had no problem. Now the kernel counts
    each reset per source, and the agent exports it by pod and reason, logs one warning per pod per read naming the
    port, why and the fix, and `tcpmesh status` lists it among the problems."""
    lab = packet_lab
    node1, node2 = lab.node(1), lab.node(2)
    log = Path(node1.log_file)

    def counted() -> list[str]:
        return [line for line in lab.metrics_text(1).splitlines() if line.startswith(REFUSED)
                and 'source_workload="n1p2"' in line and 'reason="node_port"' in line]

    before = sum(float(line.rsplit(" ", 1)[1]) for line in counted())  # other tests here reset n1p2's SYNs too
    seen = len(log.read_text().splitlines())
    attack = dial(lab, "n1p2", node2.wire_address, port=NODE_PORT)
    assert attack.get("error") == "ConnectionRefusedError", attack
    eventually(lambda: sum(float(line.rsplit(" ", 1)[1]) for line in counted()) > before,
               f"{lab.capture_mode}: no {REFUSED}...}} for n1p2's reset nodePort", timeout=READ_SECONDS + 10)
    series = counted()[0]
    assert f'source_principal="{lab.pod("n1p2").spiffe_id}"' in series and node2.wire_address not in series, series
    warnings = [line for line in log.read_text().splitlines()[seen:] if "reset" in line and "n1p2" in line]
    assert any(f"nodePort {NODE_PORT} at {node2.wire_address} (Service" in line and "ebpf-connect" in line
               and "Fix:" in line for line in warnings), warnings or log.read_text().splitlines()[seen:][-20:]
    status = json.loads(lab.admin_get(1, "/debug/status"))
    assert any("n1p2" in problem and "reset by the node's table" in problem for problem in status["problems"]), status


def test_the_refusal_is_one_table_of_ours_that_cleanup_finds(packet_lab):
    lab = packet_lab
    assert node_rules.present(lab.node(1).netns), "no node rules table in node1's netns"
    module = tc_mode if lab.capture_mode == "ebpf-tc" else tproxy_mode
    assert any(TABLE in item for item in module.find_leftovers(lab.node(1).netns))


def test_the_ipv4_service_address_is_meshed_despite_kube_proxys_dnat(packet_lab):
    lab = packet_lab
    since = time.time()
    marker = f"V4-VIP-{lab.capture_mode}-{uuid.uuid4().hex}"
    node1 = lab.node(1)
    with PacketCapture(node1.netns, node1.wire_ifname) as wire:
        result = dial(lab, "n1p1", VAULT[0], port=PORT, marker=marker)
        time.sleep(0.3)
    assert marker in result.get("got", ""), f"{lab.capture_mode}: the Service's IPv4 address: {result}"
    assert not any(marker.encode() in frame for frame in wire.frames)
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["destination_service_name"] == "vault")
    assert (flow["source_workload"], flow["destination_workload"], flow["security"]) == ("n1p1", "n2p1", "mutual_tls")
    since = time.time()
    attack = dial(lab, "n1p2", VAULT[0], port=PORT)
    assert "secret" not in attack.get("got", ""), attack
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], "no DENY for the intruder through the IPv4 address", 10)


def test_a_service_address_the_node_holds_is_meshed_as_kube_proxy_ipvs_makes_it(packet_lab):
    """kube-proxy's IPVS mode puts every ClusterIP on the node's kube-ipvs0, so it is a local address of the node
    — which these modes never steered (tc: a BYPASS /32 for every node address; iptables: `fib daddr type local
    return`); IPVS at LOCAL_IN then sent the connect to an endpoint in plaintext, past the DENY. The lab has no
    IPVS: the address on node1's lo stands for kube-ipvs0, and before the fix the connect was refused by the
    node's own stack (seen failing: ECONNREFUSED, nothing recorded) where IPVS would have forwarded it."""
    lab = packet_lab
    vip = "10.96.0.51"
    subprocess.run(["ip", "-n", lab.node(1).netns, "addr", "replace", f"{vip}/32", "dev", "lo"], check=True)
    lab_service_set(lab.plan, service_document(lab.plan, "ipvs", [vip], [(PORT, PORT)], [("n2p1", True)]))
    since = time.time()  # a reply alone proves nothing (the node's DNAT answers too): the flow must say ipvs
    eventually(lambda: "secret" in dial(lab, "n1p1", vip, port=PORT).get("got", "") and any(
        f["destination_service_name"] == "ipvs" and f["security"] == "mutual_tls" for f in lab.flows(1)
        if f["start_time"] >= since), f"{lab.capture_mode}: a Service address held by the node is not meshed")
    since = time.time()
    attack = dial(lab, "n1p2", vip, port=PORT)
    assert "secret" not in attack.get("got", ""), attack
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], "no DENY through the node-held Service address", 10)


def answer_secret(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"secret outside the mesh\n")


def test_passthrough_deny_refuses_ipv6_outside_the_mesh_too(packet_lab):
    """``policy.outbound_passthrough: DENY``: these modes steer every IPv4 connect and the proxy refuses what
    is outside the mesh — IPv6 outside the mesh went out untouched (seen succeeding: a node's listener
    answered the pod over IPv6). Now every IPv6 SYN from a captured pod is reset."""
    lab = packet_lab
    node1, node2 = lab.node(1), lab.node(2)
    listener = socket_in_netns(node2.netns, socket.AF_INET6)
    listener.bind((node2.wire_address6, OUTSIDE_PORT))
    listener.listen(16)
    threading.Thread(target=answer_secret, args=(listener,), daemon=True).start()
    original = Path(node1.config_file).read_text()
    config = yaml.safe_load(original)
    config.setdefault("policy", {})["outbound_passthrough"] = "DENY"
    try:
        control = dial(lab, "n1p1", node2.wire_address6, port=OUTSIDE_PORT)
        assert "secret" in control.get("got", ""), f"control: IPv6 outside the mesh (passthrough ALLOW): {control}"
        Path(node1.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
        labops.lab_restart_agent(lab.name, node1.name)
        attack = dial(lab, "n1p1", node2.wire_address6, port=OUTSIDE_PORT)
        assert attack.get("error") == "ConnectionRefusedError", \
            f"{lab.capture_mode}: under passthrough DENY a pod reached outside the mesh over IPv6: {attack}"
    finally:
        listener.close()
        Path(node1.config_file).write_text(original)
        labops.lab_restart_agent(lab.name, node1.name)
