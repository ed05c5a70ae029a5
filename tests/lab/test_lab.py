"""The lab on real namespaces and cgroups (root). Every lab is torn down in a finally block.

Each test uses its own lab name and a state root under tmp_path, so runs never collide with each
other or with a user's lab. Agents are a stand-in (tests/lab/fake_agent.py) that serves /readyz:
the real agent is exercised by the e2e tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.lab import nsenter
from agent.lab.cli import lab as lab_cli
from agent.lab.errors import LabError, LabNotFound
from agent.lab import network
from agent.lab.lab import lab_down, lab_exec, lab_status, lab_up, load_lab
from agent.lab.sniff import PacketCapture
from agent.lab.topology import interface_names, is_lab_netns

FAKE_AGENT = [sys.executable, str(Path(__file__).with_name("fake_agent.py"))]
ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(1); print("ready", flush=True)
c, peer = s.accept(); c.sendall(c.recv(100).upper()); print(peer[0], flush=True)
"""


@pytest.fixture
def lab_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def state_root(tmp_path) -> str:
    return str(tmp_path / "labs")


@contextlib.contextmanager
def running_lab(name: str, state_root: str, **kwargs):
    kwargs.setdefault("agents_enabled", False)
    try:
        yield lab_up(name, kwargs.pop("nodes", 2), kwargs.pop("pods_per_node", 2), state_root=state_root, **kwargs)
    finally:
        lab_down(name, state_root=state_root)


def lab_netns(name: str) -> list[str]:
    """Namespaces of lab ``name`` (exact role match: lab "x" must not claim lab "x-b"'s namespaces)."""
    return [ns for ns in os.listdir("/run/netns") if is_lab_netns(name, ns)] if os.path.isdir("/run/netns") else []


def root_netns_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def assert_gone(plan) -> None:
    assert lab_netns(plan.name) == []
    assert not os.path.exists(plan.cgroup)
    assert not os.path.exists(plan.state_dir)
    assert not (set(interface_names(plan)) - {"eth0"}) & root_netns_links()


def test_pods_on_different_nodes_reach_each_other_by_pod_ip(cgroup2_mount, lab_name, state_root):
    with running_lab(lab_name, state_root) as plan:
        server = lab_exec(lab_name, "n2p1", [sys.executable, "-c", ECHO_SERVER], state_root=state_root,
                          stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            with nsenter.connect_in_netns(plan.pod("n1p1").netns, (plan.pod("n2p1").ip, 7000)) as conn:
                conn.sendall(b"ping")
                assert conn.recv(100) == b"PING"
            assert server.stdout.readline().strip() == plan.pod("n1p1").ip   # routed, not NATed
            assert server.wait(5) == 0
        finally:
            server.kill()
            server.wait()


def test_same_node_pods_and_wire_capture(cgroup2_mount, lab_name, state_root):
    with running_lab(lab_name, state_root) as plan:
        listener = nsenter.listen_in_netns(plan.pod("n2p2").netns, ("0.0.0.0", 7001))
        try:
            with PacketCapture(plan.wire_netns, plan.node("node2").bridge_port) as cap:
                with nsenter.connect_in_netns(plan.pod("n1p1").netns, (plan.pod("n2p2").ip, 7001)) as conn:
                    peer, _ = listener.accept()
                    conn.sendall(b"across-the-wire")
                    assert peer.recv(100) == b"across-the-wire"
                    peer.close()
                with nsenter.connect_in_netns(plan.pod("n2p1").netns, (plan.pod("n2p2").ip, 7001)):
                    listener.accept()[0].close()
            seen = [s for s in cap.tcp_segments() if s.dport == 7001]
            assert b"across-the-wire" in b"".join(s.payload for s in seen)
            assert {s.src for s in seen} == {plan.pod("n1p1").ip}   # same-node traffic never crosses the wire
        finally:
            listener.close()


def test_exec_runs_in_pod_netns_and_cgroup_and_passes_exit_code(cgroup2_mount, lab_name, state_root):
    script = ("import socket; print(open('/proc/self/cgroup').read().strip().splitlines()[-1]); "
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('10.77.2.11', 9)); "
              "print(s.getsockname()[0])")
    base = [sys.executable, "-m", "agent.lab", "exec", "n1p2", "--name", lab_name, "--state-root", state_root, "--"]
    with running_lab(lab_name, state_root) as plan:
        out = subprocess.run(base + [sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        cgroup_line, source_ip = out.stdout.split()
        pod = plan.pod("n1p2")
        assert cgroup_line == "0::" + pod.exec_cgroup[len(cgroup2_mount):]  # the app container, as kubelet does
        assert pod.exec_cgroup == pod.cgroup + "/app" and os.path.isdir(pod.cgroup + "/pause")
        assert source_ip == pod.ip
        assert subprocess.run(base + ["sh", "-c", "exit 7"], timeout=30).returncode == 7
        missing = subprocess.run(base + ["no-such-command"], capture_output=True, text=True, timeout=30)
        assert missing.returncode == 127 and "no-such-command" in missing.stderr
        no_pod = subprocess.run(base[:4] + ["n9p9"] + base[5:] + ["true"], capture_output=True, text=True, timeout=30)
        assert no_pod.returncode == 125 and "no pod or node named 'n9p9'" in no_pod.stderr
        node = lab_exec(lab_name, "node1", ["ip", "-o", "-4", "addr", "show", "dev", "tmwire"], state_root=state_root,
                        stdout=subprocess.PIPE, text=True)
        assert "10.76.0.1/24" in node.communicate(timeout=30)[0]
        with pytest.raises(LabError, match="no pod or node named 'n9p9'"):
            lab_exec(lab_name, "n9p9", ["true"], state_root=state_root)


def test_building_the_network_again_is_a_no_op(cgroup2_mount, lab_name, state_root):
    with running_lab(lab_name, state_root, nodes=2, pods_per_node=1) as plan:
        network.build_network(plan)  # every object exists: ensure-style calls must accept that
        listener = nsenter.listen_in_netns(plan.pod("n1p1").netns, ("0.0.0.0", 7003))
        try:
            nsenter.connect_in_netns(plan.pod("n2p1").netns, (plan.pod("n1p1").ip, 7003)).close()
        finally:
            listener.close()


def test_status_json_schema(cgroup2_mount, lab_name, state_root):
    with running_lab(lab_name, state_root, service_accounts={"n2p1": "db"}):
        result = CliRunner().invoke(lab_cli, ["status", "--name", lab_name, "--state-root", state_root, "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
    assert doc["version"] == 1 and doc["name"] == lab_name and doc["phase"] == "up"
    assert set(doc) >= {"trust_domain", "agents", "state_dir", "registry_file", "ca_dir", "wire", "pod_gateway",
                        "cgroup", "nodes", "pods", "problems"}
    assert doc["problems"] == [] and doc["agents"] is False
    assert [n["name"] for n in doc["nodes"]] == ["node1", "node2"]
    node = doc["nodes"][1]
    assert set(node) == {"name", "netns", "wire_address", "wire_address6", "admin_address", "admin_socket", "pod_cidr",
                         "cgroup", "config", "log", "agent"}
    assert (node["wire_address"], node["wire_address6"], node["admin_address"], node["agent"]) == \
        ("10.76.0.2", "fd00:76::2", "10.76.0.2:15020", {"pid": None, "alive": False, "status": None})
    assert node["admin_socket"] == f"{doc['state_dir']}/nodes/node2/agent.sock"
    pod = next(p for p in doc["pods"] if p["name"] == "n2p1")
    assert pod == {"name": "n2p1", "node": "node2", "netns": f"tcpmesh-{lab_name}-n2p1", "ip": "10.77.2.11",
                   "ip6": "fd00:77:2::11", "namespace": "lab", "service_account": "db", "spiffe_id": "spiffe://lab.tcpmesh/ns/lab/sa/db",
                   "cgroup": f"{cgroup2_mount}/tcpmesh-lab-{lab_name}/node2/pods/n2p1",
                   "containers": [f"{cgroup2_mount}/tcpmesh-lab-{lab_name}/node2/pods/n2p1/pause",
                                  f"{cgroup2_mount}/tcpmesh-lab-{lab_name}/node2/pods/n2p1/app"],
                   "exec_cgroup": f"{cgroup2_mount}/tcpmesh-lab-{lab_name}/node2/pods/n2p1/app"}


def test_down_removes_everything_and_is_safe_twice(cgroup2_mount, lab_name, state_root):
    plan = lab_up(lab_name, 2, 2, agents_enabled=False, state_root=state_root)
    try:
        # 2 nodes, 4 pods, the wire and the issuer's (the default identity mode runs the issuer)
        assert len(lab_netns(lab_name)) == 8 and os.path.isdir(plan.pod("n1p1").cgroup)
        assert Path(plan.registry_file).exists() and Path(plan.node("node1").config_file).exists()
    finally:
        report = lab_down(lab_name, state_root=state_root)
    assert len(report["removed_netns"]) == 8 and len(report["stopped_pids"]) == 2  # the issuer replicas
    assert_gone(plan)
    again = CliRunner().invoke(lab_cli, ["down", "--name", lab_name, "--state-root", state_root])
    assert again.exit_code == 0 and "nothing left" in again.output
    with pytest.raises(LabNotFound):
        lab_status(lab_name, state_root=state_root)


def test_down_after_a_crash_finds_leftovers_by_listing(cgroup2_mount, lab_name, state_root):
    up = CliRunner().invoke(lab_cli, ["up", "--name", lab_name, "--state-root", state_root, "--nodes", "2",
                                      "--pods-per-node", "1", "--no-agents", "--identity", "node-ca"])
    try:   # node-ca: no issuer processes, which down would rightly refuse to kill without their record
        assert up.exit_code == 0, up.output
        plan, _ = load_lab(lab_name, state_root)
        os.unlink(plan.state_file)  # as if lab up had died before writing anything
        with pytest.raises(LabError, match="leftovers"):
            lab_status(lab_name, state_root=state_root)
        with pytest.raises(LabError, match="already exists"):
            lab_up(lab_name, 2, 1, agents_enabled=False, state_root=state_root)
    finally:
        lab_down(lab_name, state_root=state_root)
    assert_gone(plan)


def test_two_labs_with_the_same_addresses_coexist(cgroup2_mount, lab_name, state_root):
    other = lab_name + "-b"
    with running_lab(lab_name, state_root, nodes=2, pods_per_node=1) as a, \
            running_lab(other, state_root, nodes=2, pods_per_node=1) as b:
        assert a.pod("n2p1").ip == b.pod("n2p1").ip
        listener = nsenter.listen_in_netns(b.pod("n2p1").netns, ("0.0.0.0", 7002))
        try:
            nsenter.connect_in_netns(b.pod("n1p1").netns, (b.pod("n2p1").ip, 7002)).close()
            with pytest.raises(ConnectionRefusedError):  # same address in lab a: nobody listens there
                nsenter.connect_in_netns(a.pod("n1p1").netns, (a.pod("n2p1").ip, 7002))
        finally:
            listener.close()
        lab_down(lab_name, state_root=state_root)
        assert lab_netns(lab_name) == [] and len(lab_netns(other)) == 6  # 2 nodes, 2 pods, wire, issuer


def test_down_reports_processes_it_did_not_start(cgroup2_mount, lab_name, state_root):
    plan = lab_up(lab_name, 1, 1, agents_enabled=False, state_root=state_root)
    stray = lab_exec(lab_name, "n1p1", ["sleep", "60"], state_root=state_root)
    try:
        with pytest.raises(LabError, match=rf"{stray.pid} \(sleep\)"):
            lab_down(lab_name, state_root=state_root)
        assert stray.poll() is None                      # not ours to kill: still running
        assert os.path.isdir(plan.pod("n1p1").cgroup)    # and its cgroup is kept
    finally:
        stray.kill()
        stray.wait()
        lab_down(lab_name, state_root=state_root)
    assert_gone(plan)


def test_agents_start_in_node_netns_and_cgroup_and_stop_on_down(cgroup2_mount, lab_name, state_root):
    plan = lab_up(lab_name, 2, 1, agents_enabled=True, agent_argv=FAKE_AGENT + ["run"], state_root=state_root,
                  ready_timeout=30, identity="node_ca")  # the stand-in holds no SVIDs for the issuer wait
    try:
        status = lab_status(lab_name, state_root=state_root)
        # the stand-in serves /readyz only: each node's missing `tcpmesh status` is a problem, naming the socket
        assert status["problems"] == [f"{n.name}: no status from the agent: cannot reach the agent at {n.state_dir}/"
                                      "agent.sock: No such file or directory (is `tcpmesh run` running? point at its "
                                      "admin socket with --socket, --config, --lab/--node or TCPMESH_SOCKET)"
                                      for n in plan.nodes]
        assert status["ca_dir"] == plan.ca_dir
        assert Path(plan.ca_dir, "ca.crt").exists()
        pids = [n["agent"]["pid"] for n in status["nodes"]]
        assert all(n["agent"]["alive"] for n in status["nodes"])
        for node, pid in zip(plan.nodes, pids):
            seen = json.loads(Path(node.state_dir, "fake-agent.json").read_text())
            assert seen["cgroup"].strip().splitlines()[-1] == "0::" + node.agent_cgroup[len(cgroup2_mount):]
            assert seen["netns"] == os.stat(f"/run/netns/{node.netns}").st_ino
            assert open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[-3:-1] == \
                [b"--config", node.config_file.encode()]
            status_code, _ = nsenter.http_get_in_netns(node.netns, f"http://{node.admin_address}/readyz")
            assert status_code == 200
    finally:
        report = lab_down(lab_name, state_root=state_root)
    assert sorted(report["stopped_pids"]) == sorted(pids)
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in pids)
    assert_gone(plan)


def test_agent_that_dies_fails_up_points_at_its_log_and_tears_down(cgroup2_mount, lab_name, state_root):
    log_dir = Path(state_root, lab_name, "logs")
    try:
        with pytest.raises(LabError) as err:
            lab_up(lab_name, 2, 1, agents_enabled=True, agent_argv=FAKE_AGENT + ["--exit", "3"],
                   state_root=state_root, ready_timeout=30, identity="node_ca")
        message = str(err.value)
        assert "exited with code 3" in message and str(log_dir / "node1.log") in message
        assert "failing on purpose" in message and "torn down" in message
        assert lab_netns(lab_name) == []
        assert not Path(state_root, lab_name, "state.json").exists()
        assert "failing on purpose" in (log_dir / "node1.log").read_text()
    finally:
        lab_down(lab_name, state_root=state_root)
    assert not Path(state_root, lab_name).exists()


def test_down_keeps_the_access_logs_and_says_where(cgroup2_mount, lab_name, state_root, tmp_path):
    plan = lab_up(lab_name, 2, 1, agents_enabled=False, state_root=state_root)
    try:
        for node in plan.nodes:  # what an agent leaves: its keyed access log and the key that verifies it
            os.makedirs(f"{node.state_dir}/log", exist_ok=True)
            Path(node.state_dir, "log", "access.log").write_text(f'{{"node": "{node.name}"}}\n')
            Path(node.state_dir, "audit.key").write_text("key\n")
    except BaseException:
        lab_down(lab_name, state_root=state_root)
        raise
    archive_root = tmp_path / "archive"
    try:
        down = CliRunner().invoke(lab_cli, ["down", "--name", lab_name, "--state-root", state_root,
                                            "--archive-dir", str(archive_root)])
    finally:
        lab_down(lab_name, state_root=state_root)  # safe twice; removes the lab if the command failed
    assert down.exit_code == 0, down.output
    assert_gone(plan)
    (kept,) = archive_root.iterdir()
    assert kept.name.startswith(f"{lab_name}-") and kept.stat().st_mode & 0o077 == 0
    assert f"access logs kept in {kept}/<node>/" in down.output
    assert f"tcpmesh audit verify --key {kept}/node1/audit.key {kept}/node1/access.log" in down.output
    for node in ("node1", "node2"):
        assert (kept / node / "access.log").read_text() == f'{{"node": "{node}"}}\n'
        assert (kept / node / "audit.key").exists()
