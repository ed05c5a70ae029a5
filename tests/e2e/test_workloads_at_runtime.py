"""Workloads change while the agents run — through the registry file and the admin socket — and are
attached and detached without a restart; a broken file leaves the previous workloads in force.

A removed workload's pod is not "just not in the mesh": its connects are refused by the node guard
(EPERM at connect, counted as guard_denied) and nothing of it leaves the node in plaintext."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from agent.capture.pinned import read_counters
from agent.lab import lab as labops
from agent.lab.sniff import PacketCapture
from tests.e2e.conftest import Lab

POLL = 2.0 + 3.0  # the agent's poll interval plus slack


@pytest.fixture(scope="module")
def runtime_lab(bpf_capable):
    name = f"rt{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "rt.tcpmesh"))
        lab.start_server("n2p1", 7100, "digest")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30)


def socket_of(lab, node: int) -> str:
    return f"{lab.node(node).state_dir}/agent.sock"


def listed(lab, node: int) -> dict[str, dict]:
    out = cli("workload", "list", "--json", "--socket", socket_of(lab, node))
    assert out.returncode == 0, out.stderr
    return {w["name"]: w for w in json.loads(out.stdout)}


def wait_until(predicate, timeout: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def captured_flow_from(lab, pod: str, port: int, tag: str) -> dict:
    """Connect from ``pod``: the exchange completes and node1 records the flow (polled for)."""
    result = lab.run_client(pod, f"{lab.pod('n2p1').ip}:{port}", 1000, "digest", name=tag)
    assert result.get("error") is None and result["complete"], result
    return lab.wait_flow(1, lambda f: f.get("comm") == tag)


def refused_at_connect(lab, pod: str, port: int, tag: str) -> None:
    """Connect from ``pod``, which the agent no longer captures: the node guard refuses the connect
    (EPERM, counted), the proxy never sees it, and no byte of it crosses node1's wire."""
    node1 = lab.node(1)
    before = read_counters(node1.bpffs_dir)["guard_denied"]
    marker = f"{tag}-{uuid.uuid4().hex}"
    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        result = lab.run_client(pod, f"{lab.pod('n2p1').ip}:{port}", 1000, "digest", name=tag, marker=marker)
    assert result.get("errno") == errno.EPERM, f"a removed workload's connect must be refused at once: {result}"
    assert read_counters(node1.bpffs_dir)["guard_denied"] == before + 1
    segments = capture.tcp_segments()
    assert not any(port in (s.sport, s.dport) for s in segments), "a segment to the server's port left node1"
    assert not any(marker.encode() in s.payload for s in segments), "the payload crossed the wire"
    assert not [f for f in lab.flows(1) if f.get("comm") == tag], "the proxy saw a connection it must not"


def write_registry(lab, without: str | None = None, text: str | None = None) -> None:
    path = lab.plan.registry_file
    if text is None:
        doc = yaml.safe_load(open(path).read()) if without is None else yaml.safe_load(open(path + ".orig").read())
        doc["workloads"] = [w for w in doc["workloads"] if w["name"] != without]
        text = yaml.safe_dump(doc)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def test_file_and_socket_changes_attach_and_detach_without_restart(runtime_lab):
    lab = runtime_lab
    pod = lab.pod("n1p2")
    subprocess.run(["cp", lab.plan.registry_file, lab.plan.registry_file + ".orig"], check=True)
    pids_before = [n["agent"]["pid"] for n in labops.lab_status(lab.name)["nodes"]]

    assert captured_flow_from(lab, "n1p2", 7100, "rt-before")["source_principal"] == pod.spiffe_id

    # 1. removed from the file: detached within the poll interval
    write_registry(lab, without="n1p2")
    wait_until(lambda: "n1p2" not in listed(lab, 1))
    refused_at_connect(lab, "n1p2", 7100, "rt-removed")

    # 2. added through the admin socket of both nodes: captured again, with its identity
    for node in (1, 2):
        out = cli("workload", "add", "--name", "n1p2", "--namespace", pod.namespace, "--service-account",
                  pod.service_account, "--ip", pod.ip, "--node", "node1", "--cgroup", pod.cgroup,
                  "--socket", socket_of(lab, node))
        assert out.returncode == 0, out.stderr
    assert listed(lab, 1)["n1p2"]["captured"]
    flow = captured_flow_from(lab, "n1p2", 7100, "rt-socket")
    assert flow["source_principal"] == pod.spiffe_id
    dst = lab.wait_flow(2, lambda f: f["flow_id"] == flow["flow_id"])
    assert dst["source_workload"] == "n1p2"

    # 3. deleted through the socket: detached again
    assert cli("workload", "del", f"{pod.namespace}/n1p2", "--socket", socket_of(lab, 1)).returncode == 0
    assert "n1p2" not in listed(lab, 1)
    refused_at_connect(lab, "n1p2", 7100, "rt-deleted")

    # 4. a broken file is refused; the workloads in force stay, and the error is counted
    write_registry(lab, text="workloads: [unclosed\n")
    wait_until(lambda: "tcpmesh_registry_file_errors 1.0" in lab.admin_get(1, "/metrics").decode())
    assert "n1p1" in listed(lab, 1)
    assert captured_flow_from(lab, "n1p1", 7100, "rt-broken")["source_principal"] == lab.pod("n1p1").spiffe_id

    # 5. restored file: n1p2 captured again; the agents never restarted
    write_registry(lab, without="nobody")
    wait_until(lambda: "n1p2" in listed(lab, 1))
    assert captured_flow_from(lab, "n1p2", 7100, "rt-restored")["source_principal"] == pod.spiffe_id
    assert [n["agent"]["pid"] for n in labops.lab_status(lab.name)["nodes"]] == pids_before


def test_socket_rejects_bad_requests_with_the_reason(runtime_lab):
    out = cli("workload", "add", "--name", "ghost", "--namespace", "lab", "--service-account", "ghost",
              "--ip", runtime_lab.pod("n1p1").ip, "--node", "node1", "--socket", socket_of(runtime_lab, 1))
    assert out.returncode == 2 and "already the IP of lab/n1p1" in out.stderr
    out = cli("workload", "add", "--name", "ghost", "--namespace", "lab", "--service-account", "ghost",
              "--ip", "10.77.1.99", "--node", "node1", "--cgroup", "/sys/fs/cgroup/unified/does-not-exist",
              "--socket", socket_of(runtime_lab, 1))
    assert out.returncode == 2 and "cannot capture lab/ghost" in out.stderr
    assert "ghost" not in listed(runtime_lab, 1)  # nothing half-applied
    out = cli("workload", "del", "lab/n1p1", "--socket", socket_of(runtime_lab, 1))
    assert out.returncode == 2 and "registry file" in out.stderr
