"""Attack: reach a denied backend through its Service's nodePort, which kube-proxy DNATs on every node.

A real node runs kube-proxy: besides the ClusterIP, a NodePort (or LoadBalancer) Service is answered
at ``<any node's address>:<nodePort>`` and DNATed to an endpoint. The lab's kube-proxy stand-in does
the same. Until the fix only ClusterIPs were mesh destinations: a pod a DENY names connected to
node2's address and the nodePort, the connect left the pod untouched (outside the mesh), node2's
DNAT delivered it to the backend in plaintext, and the server answered — seen succeeding: it answered
``secret for ::ffff:10.77.1.12`` and no node recorded anything. Now every (node address, nodePort)
is a mesh destination of that port only: meshed to an endpoint like the ClusterIP, and denied like
the pod address — on another node's address, on the client's own node's address, and where that
address is also the capture's redirect address (the DaemonSet's shape: the node's own IP).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.lab import lab as labops
from agent.lab.services import lab_service_set, service_document
from agent.lab.topology import POD_GATEWAY, POD_GATEWAY6
from tests.e2e.conftest import Lab
from tests.hostile.test_hostile_services_ipv6 import DENY_INTRUDER, SERVER, dial, eventually, write_policy

PORT = 7417
NODE_PORT = 30760
VIP = "10.96.0.60"


@pytest.fixture(scope="module")
def np_lab(bpf_capable):
    name = f"hn{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "hn.tcpmesh",
                                      service_accounts={"n1p1": "web", "n1p2": "intruder", "n2p1": "vault"}))
        for pod in ("n2p1",):
            server = labops.lab_exec(name, pod, [sys.executable, "-c", SERVER, str(PORT)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            lab.apps.append(server)
            assert "listening" in server.stdout.readline()
        lab_service_set(lab.plan, service_document(lab.plan, "vault", [VIP], [(PORT, PORT)], [("n2p1", True)],
                                                   node_ports=[NODE_PORT]))
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        write_policy(lab, "deny-intruder", DENY_INTRUDER.format(ns=lab.plan.namespace,
                                                                principal=lab.pod("n1p2").spiffe_id))
        started = time.time()
        eventually(lambda: "secret" in dial(lab, "n1p1", VIP, port=PORT).get("got", "") and any(
            f["destination_service_name"] == "vault" for f in lab.flows(1) if f["start_time"] >= started),
            "control: n1p1 never reached the Service's ClusterIP through the mesh")
        eventually(lambda: not dial(lab, "n1p2", lab.pod("n2p1").ip, port=PORT).get("got"), "the DENY never applied")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
            labops.lab_down(name)


def test_the_node_port_of_another_node_is_meshed_for_an_allowed_pod(np_lab):
    lab = np_lab
    since = time.time()
    result = dial(lab, "n1p1", lab.node(2).wire_address, port=NODE_PORT, marker="via-node-port")
    assert "via-node-port" in result.get("got", ""), result
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["source_workload"] == "n1p1"
                         and f["destination_service_name"] == "vault")
    assert (flow["destination_workload"], flow["security"]) == ("n2p1", "mutual_tls"), flow


@pytest.mark.parametrize("node", [2, 1], ids=["other-node", "own-node"])
def test_a_denied_pod_cannot_reach_the_backend_through_a_node_port(np_lab, node):
    lab = np_lab
    since = time.time()
    attack = dial(lab, "n1p2", lab.node(node).wire_address, port=NODE_PORT, marker="let-me-in")
    assert "secret" not in attack.get("got", ""), f"the intruder read the backend through node{node}'s nodePort: {attack}"
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], "no DENY recorded for the nodePort connect", timeout=10)


# where kube-proxy (iptables mode, nodePortAddresses unset) answers a nodePort besides the InternalIP
OTHER_ADDRESSES = {
    "its-pods-gateway": lambda lab: POD_GATEWAY,              # a local address of the pod's own node
    "its-pods-ipv6-gateway": lambda lab: f"{POD_GATEWAY6}%eth0",  # link-local: the records carry no scope
    "other-node-ipv6": lambda lab: lab.node(2).wire_address6,  # node2's second InternalIP (status.addresses)
    "own-node-ipv6": lambda lab: lab.node(1).wire_address6,
}


@pytest.mark.parametrize("where", OTHER_ADDRESSES)
def test_a_node_port_at_another_address_of_a_node_is_meshed_and_denied(np_lab, where):
    """Seen succeeding on main (the lab's kube-proxy stand-in answering nodePorts on every local address, as
    kube-proxy does): the intruder read ``secret`` in plaintext at each address, nothing recorded — only
    (InternalIP, nodePort) was a mesh destination. Now every address of a node (the registry's
    ``other_addresses``, from status.addresses) and every local address of the agent's own node is one."""
    lab = np_lab
    address = OTHER_ADDRESSES[where](lab)
    since = time.time()
    attack = dial(lab, "n1p2", address, port=NODE_PORT, marker="let-me-in")
    assert "secret" not in attack.get("got", ""), f"the intruder read the backend at {address}:{NODE_PORT}: {attack}"
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], f"no DENY recorded for {address}:{NODE_PORT}", timeout=10)
    since = time.time()
    allowed = dial(lab, "n1p1", address, port=NODE_PORT, marker="other-address")
    assert "other-address" in allowed.get("got", ""), allowed
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["source_workload"] == "n1p1"
                         and f["destination_service_name"] == "vault")
    assert (flow["destination_workload"], flow["security"]) == ("n2p1", "mutual_tls"), flow


def test_the_own_node_port_is_meshed_when_the_node_address_is_the_redirect_address(np_lab):
    """The DaemonSet redirects to the node's own IP: a connect to that address is left alone by the connect hook
    unless a mesh entry names that address and port (bpf/capture_connect.c)."""
    lab = np_lab
    node = lab.node(1)
    original = Path(node.config_file).read_text()
    config = yaml.safe_load(original)
    config["capture"]["redirect_address"] = node.wire_address
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        labops.lab_restart_agent(lab.name, node.name)
        allowed = dial(lab, "n1p1", node.wire_address, port=NODE_PORT, marker="own-node")
        assert "own-node" in allowed.get("got", ""), allowed
        attack = dial(lab, "n1p2", node.wire_address, port=NODE_PORT, marker="let-me-in")
        assert "secret" not in attack.get("got", ""), f"own node's nodePort at the redirect address: {attack}"
        assert "secret" in dial(lab, "n1p1", lab.pod("n2p1").ip, port=PORT).get("got", "")  # the mesh still works
    finally:
        Path(node.config_file).write_text(original)
        labops.lab_restart_agent(lab.name, node.name)


HOST_PORT = 31001


@pytest.fixture
def host_port(np_lab):
    """n2p1 gets a hostPort: the CNI portmap plugin's DNAT (``--dst-type LOCAL``, here one nft rule in node2's netns)
    and the registry entry the Kubernetes source reads from ``containers[].ports[].hostPort``."""
    lab = np_lab
    netns, pod = lab.node(2).netns, lab.pod("n2p1")
    rules = (f"table ip tcpmesh_hostport {{\n  chain prerouting {{\n"
             f"    type nat hook prerouting priority dstnat; policy accept;\n"
             f"    fib daddr type local tcp dport {HOST_PORT} dnat to {pod.ip}:{PORT}\n  }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)
    registry = Path(lab.plan.registry_file)
    original = registry.read_text()
    doc = yaml.safe_load(original)
    next(w for w in doc["workloads"] if w["name"] == "n2p1")["host_ports"] = [{"port": HOST_PORT, "target_port": PORT}]
    replace_registry(registry, yaml.safe_dump(doc, sort_keys=False))
    try:
        yield
    finally:
        replace_registry(registry, original)
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "tcpmesh_hostport"], check=True)


def replace_registry(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)  # the registry must not be writable by others (agent/filetrust.py)
    os.replace(tmp, path)


def test_a_denied_pod_cannot_reach_a_pod_through_its_host_port(np_lab, host_port):
    """Seen succeeding on main (the registry had no hostPorts): the intruder read ``secret`` from n2p1 through
    node2's address and the hostPort, outside the mesh, nothing recorded. Now a workload's hostPorts are frontends
    at every address of its node, that port only: meshed to that pod on its container port, and denied."""
    lab = np_lab
    since = time.time()
    eventually(lambda: "via-host-port" in dial(lab, "n1p1", lab.node(2).wire_address, port=HOST_PORT,
                                               marker="via-host-port").get("got", "") and any(
        f["destination_workload"] == "n2p1" and f["security"] == "mutual_tls" and f["destination_port"] == PORT
        for f in lab.flows(1) if f["start_time"] >= since and f["source_workload"] == "n1p1"),
        "the allowed pod never reached n2p1 through its hostPort in the mesh", timeout=15)
    since = time.time()
    attack = dial(lab, "n1p2", lab.node(2).wire_address, port=HOST_PORT, marker="host-port")
    assert "secret" not in attack.get("got", ""), f"the intruder read n2p1 through its hostPort: {attack}"
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], "no DENY recorded for the hostPort", timeout=10)


LATE_ADDRESS = "10.78.0.1"  # in no registry: an address the node gets after its agent is ready
FOLLOW_SECONDS = 3.0  # the agent re-applies within 1 s of the kernel's notice (docs/capture-modes.md); margin


@pytest.fixture
def late_address(np_lab):
    """An address added to node1 (its netns' lo; kube-proxy answers a nodePort on every local address) after the
    agent is ready, with no registry change after it; removed afterwards."""
    netns = np_lab.node(1).netns
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{LATE_ADDRESS}/32", "dev", "lo"], check=True)
    try:
        yield LATE_ADDRESS
    finally:
        subprocess.run(["ip", "-n", netns, "addr", "del", f"{LATE_ADDRESS}/32", "dev", "lo"], check=False)


def test_an_address_the_node_gets_later_is_a_node_port_frontend_without_a_registry_change(np_lab, late_address):
    """The node's addresses were read only when the registry changed: an address added later was no frontend until
    the next change. Seen succeeding on main: the intruder read ``secret`` in plaintext at the new address and the
    nodePort, nothing recorded. Now the agent follows rtnetlink's address notifications (and re-applies within 1 s)."""
    lab = np_lab
    time.sleep(FOLLOW_SECONDS)
    since = time.time()
    attack = dial(lab, "n1p2", late_address, port=NODE_PORT, marker="let-me-in")
    assert "secret" not in attack.get("got", ""), \
        f"the intruder read the backend at an address node1 got after its agent started: {attack}"
    eventually(lambda: [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                        and f["source_workload"] == "n1p2"], f"no DENY recorded at {late_address}", timeout=10)
    since = time.time()
    allowed = dial(lab, "n1p1", late_address, port=NODE_PORT, marker="late-address")
    assert "late-address" in allowed.get("got", ""), allowed
    flow = lab.wait_flow(1, lambda f: f["start_time"] >= since and f["source_workload"] == "n1p1"
                         and f["destination_service_name"] == "vault")
    assert (flow["destination_workload"], flow["security"]) == ("n2p1", "mutual_tls"), flow
