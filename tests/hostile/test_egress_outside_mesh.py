"""Attack: a pod borrows its node's address to reach a destination outside the mesh (issue #14, item 3).

A server in *another node's* network namespace — not a workload, so outside the mesh — records the
peer address of every connection. Until the fix, a pod's connect to it was redirected to the agent,
which dialled it from the node's netns: the server saw the node's address, so any pod could reach
what only its node may reach (a metadata service, node-local services, anything trusting source
addresses) and escape its own egress rules. Now the connect hook leaves every destination outside
the mesh alone: the connection arrives from the pod's own address, shows up in telemetry (a kernel
event: counter + access log with pid/comm), and with ``policy.outbound_passthrough: DENY`` it is
refused at connect() with EPERM.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.lab import lab as labops
from agent.lab.files import access_log_path
from agent.lab.nsenter import listen_in_netns
from tests.e2e.conftest import Lab

PEER_PORT = 7411

# Run inside a pod: connect, read the peer address the server saw, print one JSON line.
CLIENT = r"""
import json, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    print(json.dumps({"seen_as": got.decode().strip(), "peername": s.getpeername()[0]}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": str(exc)}))
"""


class PeerRecorder:
    """A server in a node's netns that answers every connection with the address it came from."""

    def __init__(self, netns: str, address: tuple[str, int]) -> None:
        self.sock = listen_in_netns(netns, address)
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with conn:
                self.seen.append(peer[0])
                conn.sendall(f"{peer[0]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def egress_lab(bpf_capable):
    name = f"eg{uuid.uuid4().hex[:6]}"
    lab = recorder = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 1, "eg.tcpmesh"))
        node2 = lab.node(2)
        recorder = PeerRecorder(node2.netns, (node2.wire_address, PEER_PORT))
        yield lab, recorder
    finally:
        if recorder is not None:
            recorder.close()
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def connect_from(lab: Lab, pod: str, address: str, port: int) -> dict:
    proc = labops.lab_exec(lab.name, pod, [sys.executable, "-c", CLIENT, address, str(port)],
                           stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    result["pid"] = proc.pid
    return result


def access_records(node) -> list[dict]:
    path = Path(access_log_path(node))
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_record(node, predicate, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for record in access_records(node):
            if predicate(record):
                return record
        assert time.monotonic() < deadline, f"no matching access record on {node.name}: {access_records(node)[-5:]}"
        time.sleep(0.2)


def egress_counter(lab: Lab, decision: str, workload: str) -> float:
    total = 0.0
    for line in lab.admin_get(1, "/metrics").decode().splitlines():
        if line.startswith("tcpmesh_egress_outside_mesh_total{") and f'decision="{decision}"' in line \
                and f'source_workload="{workload}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def set_passthrough(lab: Lab, value: str) -> None:
    node = lab.node(1)
    config = yaml.safe_load(Path(node.config_file).read_text())
    config.setdefault("policy", {})["outbound_passthrough"] = value
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    labops.lab_restart_agent(lab.name, node.name)


def test_a_connection_outside_the_mesh_arrives_from_the_pods_own_address(egress_lab):
    lab, recorder = egress_lab
    pod, node2 = lab.pod("n1p1"), lab.node(2)
    result = connect_from(lab, "n1p1", node2.wire_address, PEER_PORT)
    assert "errno" not in result, result
    # before the fix: 10.76.0.1, the node's address — the agent had dialled it on the pod's behalf
    assert result["seen_as"] == pod.ip, f"the destination saw {result['seen_as']}, not the pod's {pod.ip}"
    assert result["peername"] == node2.wire_address


def test_the_connection_outside_the_mesh_is_counted_and_logged_with_pid_and_comm(egress_lab):
    lab, recorder = egress_lab
    node1, node2 = lab.node(1), lab.node(2)
    before = egress_counter(lab, "allow", "n1p1")
    result = connect_from(lab, "n1p1", node2.wire_address, PEER_PORT)
    assert "errno" not in result, result
    record = wait_record(node1, lambda r: r.get("event") == "egress" and r.get("pid") == result["pid"])
    assert record["decision"] == "allow" and record["source_workload"] == "n1p1"
    assert record["destination_ip"] == node2.wire_address and record["destination_port"] == PEER_PORT
    assert record["comm"].startswith("python")
    deadline = time.monotonic() + 5
    while egress_counter(lab, "allow", "n1p1") < before + 1:
        assert time.monotonic() < deadline, "tcpmesh_egress_outside_mesh_total did not count the connection"
        time.sleep(0.2)


def test_passthrough_deny_refuses_at_connect_and_says_who_tried(egress_lab):
    lab, recorder = egress_lab
    node1, node2 = lab.node(1), lab.node(2)
    set_passthrough(lab, "DENY")
    try:
        seen_before = len(recorder.seen)
        result = connect_from(lab, "n1p1", node2.wire_address, PEER_PORT)
        # before the fix: connected (to the agent), then reset — the app could not tell why
        assert result.get("errno") == errno.EPERM, result
        assert len(recorder.seen) == seen_before, "a denied connection reached the destination"
        record = wait_record(node1, lambda r: r.get("event") == "egress" and r.get("pid") == result["pid"])
        assert record["decision"] == "deny" and record["source_workload"] == "n1p1"
        assert record["comm"].startswith("python")
        assert egress_counter(lab, "deny", "n1p1") >= 1
        # the mesh itself is unaffected by the egress switch
        lab.start_server("n2p1", 7412, "echo")
        meshed = lab.run_client("n1p1", f"{lab.pod('n2p1').ip}:7412", 1000, "echo")
        assert "error" not in meshed, meshed
    finally:
        set_passthrough(lab, "ALLOW")


@pytest.mark.parametrize("mode", ["ebpf-tc", "iptables"])
def test_the_packet_level_modes_leave_destinations_outside_the_mesh_alone_too(bpf_capable, mode):
    """ebpf-tc and iptables steer by destination prefix: only the registry's workload addresses."""
    name = f"eg{uuid.uuid4().hex[:6]}"
    lab = recorder = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 1, "eg.tcpmesh", capture_mode=mode), mode)
        node2 = lab.node(2)
        recorder = PeerRecorder(node2.netns, (node2.wire_address, PEER_PORT))
        result = connect_from(lab, "n1p1", node2.wire_address, PEER_PORT)
        assert result.get("seen_as") == lab.pod("n1p1").ip, result
        lab.start_server("n2p1", 7413, "echo")  # the mesh is still captured
        meshed = lab.run_client("n1p1", f"{lab.pod('n2p1').ip}:7413", 1000, "echo")
        assert "error" not in meshed, meshed
        assert any(f.get("destination_workload") == "n2p1" and f.get("security") == "mutual_tls"
                   for f in lab.flows(1)), lab.flows(1)
    finally:
        if recorder is not None:
            recorder.close()
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)
