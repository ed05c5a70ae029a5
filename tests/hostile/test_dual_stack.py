"""Attack: IPv6 around the mesh (issue #14, item 4).

Every pod and node of the lab also has an IPv6 address (ULA). Until the fix connect6 let native
IPv6 through untouched, the node guard passed it and tcpmesh_inb4 let every non-IPv4 packet in: a
pod reached another node's pod over IPv6 in plaintext, and a STRICT pod took plaintext IPv6 SYNs
from anyone. Now an IPv6 connection to a workload is captured and carried like IPv4 (both
identities on the flow), plaintext IPv6 into a STRICT pod is dropped (tcpmesh_inb6), and with
``capture.ipv6: false`` an IPv6 connect to a workload fails at connect() — never plaintext.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.lab import lab as labops
from agent.lab.files import access_log_path
from agent.lab.nsenter import socket_in_netns
from agent.lab.sniff import PacketCapture
from tests.e2e.conftest import Lab

PORT = 7421
RELOAD = 2.0 + 3.0  # the agent's policy poll interval plus slack

SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
def serve(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data:
                return
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys
ip, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6)
s.settimeout(5)
try:
    s.connect((ip, port))
    s.sendall(marker)
    got = b""
    while len(got) < len(marker):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    print(json.dumps({"echoed": got == marker, "peer": list(s.getpeername()[:2])}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": str(exc)}))
"""

PEER_AUTH = """\
    kind: PeerAuthentication
    metadata: {{name: n2p1-inbound6, namespace: lab}}
    spec:
      selector: {{workload: n2p1}}
      mtls: {{mode: {mode}}}
    """


@pytest.fixture(scope="module")
def dual_lab(bpf_capable):
    name = f"ds{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "ds.tcpmesh"))
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        server = labops.lab_exec(name, "n2p1", [sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE,
                                 text=True)
        lab.apps.append(server)
        assert server.stdout.readline().strip() == "listening"
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def connect6(lab: Lab, pod: str, ip: str, marker: str) -> dict:
    proc = labops.lab_exec(lab.name, pod, [sys.executable, "-c", CLIENT, ip, str(PORT), marker],
                           stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def plaintext_connect6(netns: str, ip: str) -> str:
    """From ``netns``, outside every pod cgroup (not meshed): 'connected' or the error's name."""
    sock = socket_in_netns(netns, socket.AF_INET6)
    try:
        sock.settimeout(1.0)
        sock.connect((ip, PORT))
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()


def records(node) -> list[dict]:
    path = Path(access_log_path(node))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_the_lab_is_dual_stack(dual_lab):
    status = labops.lab_status(dual_lab.name)
    assert all(p["ip6"].startswith("fd") for p in status["pods"]), status["pods"]
    assert all(n["wire_address6"].startswith("fd") for n in status["nodes"]), status["nodes"]


def test_an_ipv6_connection_across_nodes_is_meshed(dual_lab):
    lab = dual_lab
    target = lab.pod("n2p1").ip6
    marker = f"V6-PLAINTEXT-{uuid.uuid4().hex}"
    node1 = lab.node(1)
    with PacketCapture(node1.netns, node1.wire_ifname) as wire:
        result = connect6(lab, "n1p1", target, marker)
        time.sleep(0.3)
    assert result.get("echoed"), result
    assert result["peer"] == [target, PORT]  # getpeername shows the IPv6 address the app asked for
    assert not any(marker.encode() in frame for frame in wire.frames), "the IPv6 payload crossed the wire in plaintext"
    source = lab.wait_flow(1, lambda f: f["destination_ip"] == target and f["reporter"] == "source")
    assert (source["source_workload"], source["destination_workload"], source["security"]) == \
        ("n1p1", "n2p1", "mutual_tls")
    destination = lab.wait_flow(2, lambda f: f["flow_id"] == source["flow_id"] and f["reporter"] == "destination")
    assert destination["source_principal"] == lab.pod("n1p1").spiffe_id
    logged = [r for r in records(node1) if r.get("flow_id") == source["flow_id"]]
    assert logged and logged[-1]["destination_principal"] == lab.pod("n2p1").spiffe_id
    metrics = lab.admin_get(1, "/metrics").decode()
    assert any(line.startswith("tcpmesh_tcp_connections_opened_total{") and 'source_workload="n1p1"' in line
               and 'destination_workload="n2p1"' in line for line in metrics.splitlines())


def test_plaintext_ipv6_into_a_strict_pod_is_dropped(dual_lab):
    lab = dual_lab
    target = lab.pod("n2p1").ip6
    path = f"{lab.plan.state_dir}/policies/peer-auth6.yaml"
    Path(path).write_text(textwrap.dedent(PEER_AUTH.format(mode="STRICT")))
    try:
        deadline = time.monotonic() + RELOAD
        while plaintext_connect6(lab.node(2).netns, target) == "connected":
            # before the fix: always connected — tcpmesh_inb4 let every IPv6 packet in
            assert time.monotonic() < deadline, "STRICT did not stop plaintext IPv6 from the node"
            time.sleep(0.3)
        # from the node itself, and from another node's pod netns outside its cgroup (not meshed)
        assert plaintext_connect6(lab.node(2).netns, target) in ("TimeoutError", "timeout")
        assert plaintext_connect6(lab.pod("n1p2").netns, target) in ("TimeoutError", "timeout")
        meshed = connect6(lab, "n1p1", target, "through-the-mesh")
        assert meshed.get("echoed"), meshed
    finally:
        os.unlink(path)


def test_ipv6_meshing_off_fails_at_connect_never_plaintext(dual_lab):
    lab = dual_lab
    node = lab.node(1)
    original = Path(node.config_file).read_text()
    config = yaml.safe_load(original)
    config["capture"]["ipv6"] = False
    Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        labops.lab_restart_agent(lab.name, node.name)
        result = connect6(lab, "n1p1", lab.pod("n2p1").ip6, "v6-off")
        assert result.get("errno") == errno.EPERM, result
    finally:
        Path(node.config_file).write_text(original)
        labops.lab_restart_agent(lab.name, node.name)
