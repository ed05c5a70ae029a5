"""Same-node pairs on the lab (issue 19): client and server pods on one node never take a tunnel to the
node itself (agent.proxy.local, ``proxy.same_node: local``), yet are authorized, attributed and
recorded exactly as cross-node flows are: both reporters' records on the one node, same flow id,
exact byte counts both ways, half-close and resets carried, a DENY still denies, and nothing is left
behind after many connections.

Proof that no tunnel was used: node1's inbound proxy completed no TLS handshake
(``tcpmesh_tunnel_handshake_duration_seconds_count{reporter="destination"}`` unchanged), where the
tunnel path (``proxy.same_node: tunnel``, today's path before this change) makes one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from prometheus_client.parser import text_string_to_metric_families

from agent.lab import lab as labops
from tests.e2e.conftest import module_lab

MIB = 1024 * 1024
RELOAD = 2.0 + 3.0  # the agent's policy poll interval plus slack
HANDSHAKES = "tcpmesh_tunnel_handshake_duration_seconds_count"


local_lab = module_lab("local_lab", "sn", 2, 2, "sn.tcpmesh")


def metric(lab, node: int, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(lab.metrics_text(node)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def pair_flows(lab, node: int, client: str, server: str, known: set[str]) -> list[dict]:
    return [f for f in lab.flows(node) if f["flow_id"] not in known and f["source_workload"] == client
            and f["destination_workload"] == server]


def closed_pair(lab, node: int, client: str, server: str, known: set[str], count: int, timeout: float = 20.0,
                reporters: tuple[str, ...] = ("source", "destination")):
    """Wait until ``count`` new flows of the pair are closed on ``node`` under each of ``reporters`` (a cross-node
    pair has one of them per node: name it, or the wait runs to its timeout); return {reporter: [records]}."""
    deadline = time.monotonic() + timeout
    while True:
        flows = pair_flows(lab, node, client, server, known)
        by = {r: [f for f in flows if f["reporter"] == r and f["end_time"] is not None]
              for r in ("source", "destination")}
        if all(len(by[r]) >= count for r in reporters) or time.monotonic() >= deadline:
            return by
        time.sleep(0.1)


def known_ids(lab, *nodes: int) -> set[str]:
    return {f["flow_id"] for n in nodes for f in lab.flows(n)}


def test_same_node_bytes_arrive_intact_without_a_tunnel_and_both_records_agree(local_lab):
    lab = local_lab
    lab.start_server("n1p1", 7401, "echo")
    known = known_ids(lab, 1, 2)
    handshakes = metric(lab, 1, HANDSHAKES, reporter="destination")
    result = lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7401", 16 * MIB, "echo")
    assert result.get("error") is None and result["complete"], result
    assert result["received"] == result["sent"] == 16 * MIB
    assert result["received_sha256"] == result["sent_sha256"]
    assert result["peer"] == [lab.pod("n1p1").ip, 7401]
    by = closed_pair(lab, 1, "n1p2", "n1p1", known, 1)
    (src,), (dst,) = by["source"], by["destination"]
    assert src["flow_id"] == dst["flow_id"]
    for record in (src, dst):
        assert record["security"] == "mutual_tls" and record["response_flags"] == "-", record
        assert (record["bytes_received"], record["bytes_sent"]) == (16 * MIB, 16 * MIB), record
        assert record["source_principal"] == lab.pod("n1p2").spiffe_id
        assert record["destination_principal"] == lab.pod("n1p1").spiffe_id
        assert record["source_ip"] == lab.pod("n1p2").ip and record["destination_port"] == 7401
    assert dst["pid"] == src["pid"] and src["pid"] is not None  # the client process, as a tunnel's OPEN carries it
    assert not pair_flows(lab, 2, "n1p2", "n1p1", known), "node2 recorded a same-node flow of node1"
    assert metric(lab, 1, HANDSHAKES, reporter="destination") == handshakes, \
        "node1's inbound proxy made a TLS handshake: the same-node connection took a tunnel to the node itself"


def test_same_node_half_close_lets_the_server_answer(local_lab):
    lab = local_lab
    lab.start_server("n1p1", 7402, "digest")
    known = known_ids(lab, 1)
    result = lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7402", 300_000, "digest")
    assert result["complete"], result
    digest, length = result["reply"].split()
    assert digest == result["sent_sha256"] and int(length) == 300_000
    by = closed_pair(lab, 1, "n1p2", "n1p1", known, 1)
    for reporter in ("source", "destination"):
        (record,) = by[reporter]
        assert record["response_flags"] == "-", record
        assert (record["bytes_received"], record["bytes_sent"]) == (300_000, result["received"]), record


RESET_SERVER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("listening", flush=True)
    c, _ = s.accept(); c.settimeout(20)
    got = c.recv(5)
    try:
        more = c.recv(100)
        print(json.dumps({"got": got.decode(), "after": "eof" if more == b"" else "data"}), flush=True)
    except OSError as exc:
        print(json.dumps({"got": got.decode(), "after": type(exc).__name__}), flush=True)
""")

RESET_CLIENT = textwrap.dedent("""
    import socket, struct, sys, time
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b"hello"); time.sleep(0.5)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
    print("reset", flush=True)
""")


def test_a_client_reset_reaches_the_server_as_a_reset_and_is_recorded(local_lab):
    lab = local_lab
    known = known_ids(lab, 1)
    server = labops.lab_exec(lab.name, "n1p1", [sys.executable, "-c", RESET_SERVER, "7403"],
                             stdout=subprocess.PIPE, text=True)
    lab.apps.append(server)
    assert "listening" in server.stdout.readline()
    client = labops.lab_exec(lab.name, "n1p2", [sys.executable, "-c", RESET_CLIENT, lab.pod("n1p1").ip, "7403"],
                             stdout=subprocess.PIPE, text=True)
    assert "reset" in client.communicate(timeout=30)[0]
    seen = json.loads(server.stdout.readline())
    assert seen == {"got": "hello", "after": "ConnectionResetError"}, seen
    by = closed_pair(lab, 1, "n1p2", "n1p1", known, 1)
    for reporter in ("source", "destination"):
        (record,) = by[reporter]
        assert record["response_flags"] == "DC" and record["bytes_received"] == 5, record


def test_deny_still_denies_a_same_node_pair_with_both_records(local_lab):
    lab = local_lab
    lab.start_server("n1p1", 7404, "digest")
    path = f"{lab.plan.state_dir}/policies/deny-n1p2.yaml"
    with open(path + ".tmp", "w") as f:
        f.write(textwrap.dedent(f"""\
            kind: AuthorizationPolicy
            metadata: {{name: deny-n1p2, namespace: lab}}
            spec:
              selector: {{workload: n1p1}}
              action: DENY
              rules:
                - from: [{{principals: ["{lab.pod('n1p2').spiffe_id}"]}}]
            """))
    os.replace(path + ".tmp", path)
    try:
        deadline = time.monotonic() + RELOAD
        while True:
            known = known_ids(lab, 1)
            result = lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7404", 2000, "digest", name="sn-deny")
            if "error" in result or not result["reply"]:
                break
            assert time.monotonic() < deadline, f"the DENY policy never applied: {result}"
            time.sleep(0.3)
        by = closed_pair(lab, 1, "n1p2", "n1p1", known, 1)
        (src,), (dst,) = by["source"], by["destination"]
        assert src["flow_id"] == dst["flow_id"]
        assert src["response_flags"] == dst["response_flags"] == "DENY", (src, dst)
        assert src["policy"] == dst["policy"] == "lab/deny-n1p2", (src, dst)
        assert src["bytes_received"] == dst["bytes_received"] == 0, (src, dst)
        denied = metric(lab, 1, "tcpmesh_tcp_connections_failed_total", reporter="destination",
                        source_workload="n1p2", destination_workload="n1p1", response_flags="DENY")
        assert denied >= 1
        # another identity still gets through, on the same node
        other = lab.run_client("n2p1", f"{lab.pod('n1p1').ip}:7404", 2000, "digest", name="sn-cross")
        assert other["reply"], other
    finally:
        os.unlink(path)
        deadline = time.monotonic() + RELOAD  # the next tests need n1p2 allowed again
        while not lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7404", 10, "digest", name="sn-undo").get("reply") \
                and time.monotonic() < deadline:
            time.sleep(0.3)


def test_a_strict_pod_takes_same_node_mesh_connections_and_drops_plaintext(local_lab):
    """The local path's leg to the workload is opened by the agent (its cgroup), so STRICT's SYN check
    admits it exactly as the inbound proxy's leg; plaintext from the node itself stays dropped."""
    from agent.lab.nsenter import connect_in_netns

    def plaintext(netns: str) -> str:
        try:
            connect_in_netns(netns, (lab.pod("n1p1").ip, 7407), timeout=1.0).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__

    lab = local_lab
    lab.start_server("n1p1", 7407, "digest")
    path = f"{lab.plan.state_dir}/policies/strict-n1p1.yaml"
    with open(path + ".tmp", "w") as f:
        f.write("kind: PeerAuthentication\nmetadata: {name: strict-n1p1, namespace: lab}\n"
                "spec:\n  selector: {workload: n1p1}\n  mtls: {mode: STRICT}\n")
    os.replace(path + ".tmp", path)
    try:
        deadline = time.monotonic() + RELOAD
        while plaintext(lab.node(1).netns) == "connected":
            assert time.monotonic() < deadline, "STRICT did not take effect"
            time.sleep(0.3)
        result = lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7407", 5000, "digest", name="sn-strict")
        assert "error" not in result and result["reply"].split()[0] == result["sent_sha256"], result
    finally:
        os.unlink(path)
        deadline = time.monotonic() + RELOAD
        while plaintext(lab.node(1).netns) != "connected" and time.monotonic() < deadline:
            time.sleep(0.3)


def test_same_node_records_and_metrics_have_the_cross_node_shape(local_lab):
    lab = local_lab
    lab.start_server("n1p1", 7405, "echo")
    known = known_ids(lab, 1, 2)
    assert lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7405", 1000, "echo")["complete"]
    assert lab.run_client("n2p2", f"{lab.pod('n1p1').ip}:7405", 1000, "echo")["complete"]
    local = closed_pair(lab, 1, "n1p2", "n1p1", known, 1)
    cross_src = closed_pair(lab, 2, "n2p2", "n1p1", known, 1, reporters=("source",))["source"][0]
    cross_dst = closed_pair(lab, 1, "n2p2", "n1p1", known, 1, reporters=("destination",))["destination"][0]
    for mine, theirs in ((local["source"][0], cross_src), (local["destination"][0], cross_dst)):
        assert list(mine) == list(theirs)
        for key in ("reporter", "security", "response_flags", "bytes_received", "bytes_sent", "destination_workload",
                    "destination_principal", "destination_port", "policy", "detail"):
            assert mine[key] == theirs[key], (key, mine, theirs)
    for reporter, node_of_cross in (("source", 2), ("destination", 1)):
        for name in ("tcpmesh_tcp_connections_opened_total", "tcpmesh_tcp_connections_closed_total",
                     "tcpmesh_tcp_received_bytes_total", "tcpmesh_tcp_sent_bytes_total"):
            assert metric(lab, 1, name, reporter=reporter, source_workload="n1p2", destination_workload="n1p1",
                          connection_security_policy="mutual_tls", response_flags="-") >= 1, (reporter, name)


def _agent_fds(lab, node: int) -> int:
    with open(os.path.join(lab.node(node).agent_cgroup, "cgroup.procs")) as f:
        pids = [int(p) for p in f.read().split()]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def test_many_same_node_connections_leave_nothing_open(local_lab):
    lab = local_lab
    lab.start_server("n1p1", 7406, "echo")
    for _ in range(3):  # warm: listeners, pools and caches the agent keeps
        lab.run_client("n1p2", f"{lab.pod('n1p1').ip}:7406", 100, "echo")
    time.sleep(0.5)
    fds = _agent_fds(lab, 1)
    known = known_ids(lab, 1)
    script = textwrap.dedent(f"""
        import socket
        for i in range(200):
            c = socket.create_connection(("{lab.pod('n1p1').ip}", 7406), timeout=10)
            c.sendall(b"x" * 100); got = b""
            while len(got) < 100:
                got += c.recv(100)
            c.close()
        print("done", flush=True)
    """)
    proc = labops.lab_exec(lab.name, "n1p2", [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert "done" in proc.communicate(timeout=120)[0]
    by = closed_pair(lab, 1, "n1p2", "n1p1", known, 200, timeout=30)
    assert len(by["source"]) == len(by["destination"]) == 200
    assert all(f["response_flags"] == "-" and f["bytes_received"] == f["bytes_sent"] == 100
               for r in by.values() for f in r)
    assert not [f for f in lab.flows(1) if f["end_time"] is None and f["source_workload"] == "n1p2"]
    deadline = time.monotonic() + 10
    while _agent_fds(lab, 1) > fds and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _agent_fds(lab, 1) <= fds, f"node1's agent holds {_agent_fds(lab, 1)} fds, {fds} before 200 connections"
