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

import yaml

from agent.capture.pinned import read_counters
from agent.lab import lab as labops
from agent.lab.files import access_log_path
from agent.lab.sniff import PacketCapture
from tests.e2e.conftest import module_lab
from tests.e2e.reliability_apps import MESSAGE
from tests.e2e.reliability_lab import APPS, DIGEST_PORT, ECHO_PORT

POLL = 2.0 + 3.0  # the agent's poll interval plus slack


# node-ca: step 2 adds a workload through the admin socket only; the issuer places by its own registry
# (the file), so in issuer mode that workload would wait for an SVID that never comes (by design)
runtime_lab = module_lab("runtime_lab", "rt", 2, 2, "rt.tcpmesh", identity="node_ca",
                         servers=[("n2p1", 7100, "digest")])


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


def has_svid(lab, node: int) -> set[str]:
    """The SPIFFE IDs node ``node`` holds an SVID for (its /debug/certs)."""
    return {i["spiffe_id"] for i in json.loads(lab.admin_get(node, "/debug/certs"))["identities"]}


def guard_denied_exported(lab) -> float:
    """node1's tcpmesh_capture_events_total{reason="guard_denied"} on its admin /metrics."""
    for line in lab.admin_get(1, "/metrics").decode().splitlines():
        if line.startswith("tcpmesh_capture_events_total{") and 'reason="guard_denied"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("node1's /metrics has no tcpmesh_capture_events_total{reason=\"guard_denied\"}")


def refused_at_connect(lab, pod: str, port: int, tag: str) -> None:
    """Connect from ``pod``, which the agent no longer captures: the node guard refuses the connect
    (EPERM, counted), the proxy never sees it, and no byte of it crosses node1's wire."""
    node1 = lab.node(1)
    before = read_counters(node1.bpffs_dir)["guard_denied"]
    exported_before = guard_denied_exported(lab)
    marker = f"{tag}-{uuid.uuid4().hex}"
    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        result = lab.run_client(pod, f"{lab.pod('n2p1').ip}:{port}", 1000, "digest", name=tag, marker=marker)
    assert result.get("errno") == errno.EPERM, f"a removed workload's connect must be refused at once: {result}"
    assert read_counters(node1.bpffs_dir)["guard_denied"] == before + 1
    assert guard_denied_exported(lab) == exported_before + 1, "the refusal is not on the agent's /metrics"
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

    # 5. restored file: n1p2 captured again; the agents never restarted. Its SVID is minted off the event loop
    # after the registry applies (connects refused until then, fail closed): wait for both, as a client would retry
    write_registry(lab, without="nobody")
    wait_until(lambda: "n1p2" in listed(lab, 1))
    wait_until(lambda: pod.spiffe_id in has_svid(lab, 1))
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


def start_echo_server(lab) -> None:
    proc = labops.lab_exec(lab.name, "n2p1", [sys.executable, APPS, "server", "--port", str(ECHO_PORT),
                                               "--digest-port", str(DIGEST_PORT)], stdout=subprocess.PIPE, text=True)
    lab.apps.append(proc)
    assert "listening" in proc.stdout.readline()


def open_connections(lab, pod: str) -> tuple[subprocess.Popen, subprocess.Popen, set[str]]:
    """From ``pod`` to n2p1's echo server: 2 echoing connections and an idle one (blocked in read(),
    so it tells a reset from a close); returns both clients and the 3 flow ids on node1."""
    def client(role: str, *args: str) -> subprocess.Popen:
        proc = labops.lab_exec(lab.name, pod, [sys.executable, APPS, role, "--connect",
                                               f"{lab.pod('n2p1').ip}:{ECHO_PORT}", *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.apps.append(proc)
        return proc

    holder = client("hold", "--count", "2", "--interval", "0.2")
    assert json.loads(holder.stdout.readline())["failed"] == 0
    idle = client("idle", "--timeout", "60")

    def ids() -> set[str]:
        return {f["flow_id"] for f in lab.flows(1) if f["source_workload"] == pod and f["end_time"] is None}

    wait_until(lambda: len(ids()) == 3)
    return holder, idle, ids()


def cut_with_one_record_each(lab, holder, idle, flow_ids: set[str], pod: str, node: int = 1) -> None:
    """The removed workload's open connections were reset at once — the idle client reads ECONNRESET,
    the echoing ones are lost — and each has exactly one close record on the workload's ``node`` (DC,
    why, its bytes), and the other node closed each of them too."""
    assert json.loads(idle.communicate(timeout=30)[0])["result"] == "ConnectionResetError(104)", \
        "a removed workload's open connection must be reset"
    held = json.loads(holder.communicate("", timeout=30)[0])
    assert held["lost"] == 2 and held["bad_exchanges"] == 0, held
    records = [r for r in map(json.loads, open(access_log_path(lab.node(node)), "rb").read().splitlines())
               if r.get("event") == "close"]
    for flow_id in flow_ids:
        mine = [r for r in records if r["flow_id"] == flow_id]
        assert len(mine) == 1, f"{flow_id}: {len(mine)} close records, not 1: {mine}"
        assert mine[0]["response_flags"] == "DC" and f"lab/{pod} left the registry" in mine[0]["detail"], mine[0]
        # bytes as far as they went: an echo may have been in flight when the cut came
        assert 0 <= mine[0]["bytes_received"] - mine[0]["bytes_sent"] <= MESSAGE, mine[0]
        assert mine[0]["bytes_received"] % MESSAGE == mine[0]["bytes_sent"] % MESSAGE == 0, mine[0]
    wait_until(lambda: all(f["end_time"] is not None for f in lab.flows(3 - node) if f["flow_id"] in flow_ids))


def test_a_removed_workloads_open_connections_are_cut_and_recorded(runtime_lab):
    """docs/registry.md "Removing a workload": removed through the registry file, then (added back
    through the admin socket) through `tcpmesh workload del`, a workload's open connections are reset
    at once and recorded, and its new connects are refused at connect; a server's pod removed: its
    node cuts the connections to it, and the clients on the other node are reset too."""
    lab = runtime_lab
    pod = lab.pod("n1p2")
    start_echo_server(lab)
    subprocess.run(["cp", lab.plan.registry_file, lab.plan.registry_file + ".orig"], check=True)
    try:
        holder, idle, flow_ids = open_connections(lab, "n1p2")
        write_registry(lab, without="n1p2")
        wait_until(lambda: "n1p2" not in listed(lab, 1))
        cut_with_one_record_each(lab, holder, idle, flow_ids, "n1p2")
        refused_at_connect(lab, "n1p2", 7100, "rt-cut-file")

        for node in (1, 2):
            out = cli("workload", "add", "--name", "n1p2", "--namespace", pod.namespace, "--service-account",
                      pod.service_account, "--ip", pod.ip, "--node", "node1", "--cgroup", pod.cgroup,
                      "--socket", socket_of(lab, node))
            assert out.returncode == 0, out.stderr
        holder, idle, flow_ids = open_connections(lab, "n1p2")
        assert cli("workload", "del", f"{pod.namespace}/n1p2", "--socket", socket_of(lab, 1)).returncode == 0
        cut_with_one_record_each(lab, holder, idle, flow_ids, "n1p2")
        refused_at_connect(lab, "n1p2", 7100, "rt-cut-socket")

        # the server's pod removed (the file again): node2 cuts its side, node1's clients are reset too
        cli("workload", "del", f"{pod.namespace}/n1p2", "--socket", socket_of(lab, 2))
        write_registry(lab, without="nobody")
        wait_until(lambda: "n1p2" in listed(lab, 1))
        holder, idle, flow_ids = open_connections(lab, "n1p1")
        write_registry(lab, without="n2p1")
        wait_until(lambda: "n2p1" not in listed(lab, 2))
        cut_with_one_record_each(lab, holder, idle, flow_ids, "n2p1", node=2)
    finally:
        cli("workload", "del", f"{pod.namespace}/n1p2", "--socket", socket_of(lab, 2))
        write_registry(lab, without="nobody")
        wait_until(lambda: "n1p2" in listed(lab, 1))
