"""Telemetry on the lab, with real agents and a real Prometheus (Debian's package) scraping them:
live bytes of a long flow, `tcpmesh flows` with the client process, denials, the hash-chained audit
log of the run (and tampering named), kernel TCP health per identity pair, every Grafana dashboard
query answered, and the series of a removed workload gone — and after all of it, in ebpf-connect, neither agent has
loaded the pyroute2 package (tests/footprint.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import lab as labops
from agent.lab.files import access_log_path, audit_key_path
from agent.lab.nsenter import http_get_in_netns
from tests.conftest import skip_or_fail
from tests.e2e.conftest import Lab
from tests.footprint import PYROUTE2_LOADED, pyroute2_mapped

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "tcpmesh.json")
PROMETHEUS_PORT = 19090
LONG_SECONDS = 10.0
ECHO_PORT, LOSSY_PORT, DENIED_PORT = 7201, 7202, 7399
POLL = 2.0 + 3.0  # the agents' registry poll plus slack

# A client that keeps one connection open for N seconds, echoing 32 KiB every 0.25 s.
LONG_CLIENT = r"""
import ctypes, json, os, socket, sys, time
ctypes.CDLL(None).prctl(15, b"tm-longflow", 0, 0, 0)
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
print(json.dumps({"pid": os.getpid()}), flush=True)
chunk, sent, received = os.urandom(32768), 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    s.sendall(chunk); sent += len(chunk)
    need = len(chunk)
    while need:
        data = s.recv(need); need -= len(data); received += len(data)
    time.sleep(0.25)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
print(json.dumps({"sent": sent, "received": received}), flush=True)
"""


class Prometheus:
    """Debian's prometheus, run in node1's netns, scraping both agents every second."""

    def __init__(self, lab: Lab, workdir: str) -> None:
        self.lab = lab
        self.netns = lab.node(1).netns
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "tcpmesh-agents", "static_configs": [
                      {"targets": [node.admin_address for node in lab.plan.nodes]}]}]}
        with open(os.path.join(workdir, "prometheus.yml"), "w") as f:
            yaml.safe_dump(config, f)
        self.log = open(os.path.join(workdir, "prometheus.log"), "w")
        self.proc = labops.lab_exec(lab.name, "node1", [
            shutil.which("prometheus"), f"--config.file={workdir}/prometheus.yml",
            f"--storage.tsdb.path={workdir}/data", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
            "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {open(self.log.name).read()[-2000:]}"
            try:
                if self._get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("prometheus did not become ready")

    def _get(self, path: str) -> tuple[int, bytes]:
        return http_get_in_netns(self.netns, f"http://127.0.0.1:{PROMETHEUS_PORT}{path}")

    def query(self, promql: str) -> list[dict]:
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{promql}: {answer}"
        return answer["data"]["result"]

    def wait_value(self, promql: str, expected: float, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            result = self.query(promql)
            value = float(result[0]["value"][1]) if result else None
            if value == expected:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{promql} = {value}, expected {expected}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def tlab(bpf_capable):
    if shutil.which("prometheus") is None:
        skip_or_fail("prometheus is not installed (Debian package `prometheus`; deploy/bootstrap-debian.sh installs it)")
    name = f"tm{uuid.uuid4().hex[:6]}"
    lab = prometheus = None
    workdir = tempfile.mkdtemp(prefix="tcpmesh-prom-")
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "tel.tcpmesh"))
        prometheus = Prometheus(lab, workdir)
        lab.prometheus = prometheus
        write_deny_policy(lab)
        lab.start_server("n2p1", ECHO_PORT, "echo")
        prometheus.wait_ready()
        yield lab
    finally:
        if prometheus is not None:
            prometheus.stop()
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)
        shutil.rmtree(workdir, ignore_errors=True)


def write_deny_policy(lab: Lab) -> None:
    os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
    with open(f"{lab.plan.state_dir}/policies/deny-port.yaml", "w") as f:
        f.write("kind: AuthorizationPolicy\nmetadata: {name: no-7399, namespace: lab}\n"
                f"spec:\n  selector: {{workload: n2p2}}\n  action: DENY\n  rules:\n"
                f"    - to: [{{ports: [{DENIED_PORT}]}}]\n")


def metric(lab: Lab, node: int, name: str, **labels: str) -> float:
    text = lab.admin_get(node, "/metrics").decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=30)


def pair(lab: Lab, src: str, dst: str) -> dict[str, str]:
    return {"source_principal": lab.pod(src).spiffe_id, "destination_principal": lab.pod(dst).spiffe_id}


# ---------------------------------------------------------------------------------------------- tests

def test_a_long_flow_reports_growing_bytes_and_tcpmesh_flows_names_its_process(tlab):
    lab = tlab
    client = labops.lab_exec(lab.name, "n1p1", [sys.executable, "-c", LONG_CLIENT, lab.pod("n2p1").ip,
                                                str(ECHO_PORT), str(LONG_SECONDS)], stdout=subprocess.PIPE, text=True)
    lab.apps.append(client)
    pid = json.loads(client.stdout.readline())["pid"]
    labels = {"reporter": "source", **pair(lab, "n1p1", "n2p1")}
    samples, listed = [], None
    for _ in range(3):
        time.sleep(2.6)
        assert client.poll() is None, "the long client ended early"
        samples.append((metric(lab, 1, "tcpmesh_tcp_received_bytes_total", **labels),
                        metric(lab, 2, "tcpmesh_tcp_received_bytes_total", **{**labels, "reporter": "destination"})))
        if listed is None:
            out = cli("flows", "--json", "--port", str(ECHO_PORT), "--socket", f"{lab.node(1).state_dir}/agent.sock")
            assert out.returncode == 0, out.stderr
            listed = [json.loads(line) for line in out.stdout.splitlines()]
    assert client.poll() is None, "the flow closed before the growth was seen"
    source, destination = zip(*samples)
    assert 0 < source[0] < source[1] < source[2], f"node1 bytes did not grow while the flow was open: {source}"
    assert 0 < destination[0] < destination[1] < destination[2], f"node2 bytes did not grow: {destination}"
    (live,) = [f for f in listed if f["state"] == "open"]
    assert live["pid"] == pid and live["comm"] == "tm-longflow" and live["uid"] == os.getuid()
    assert live["cgroup_id"] == os.stat(lab.pod("n1p1").exec_cgroup).st_ino  # the container's, below the pod's
    assert live["source_principal"] == lab.pod("n1p1").spiffe_id and live["bytes_received"] > 0
    table = cli("flows", "--workload", "lab/n1p1", "--socket", f"{lab.node(1).state_dir}/agent.sock")
    assert f"{pid}/tm-longflow" in table.stdout and "lab/n2p1:7201" in table.stdout
    out, _ = client.communicate(timeout=LONG_SECONDS + 10)
    final = json.loads(out.strip().splitlines()[-1])
    closed = lab.wait_flow(1, lambda f: f["pid"] == pid)
    assert closed["bytes_received"] == final["sent"] and closed["bytes_sent"] == final["received"]
    assert metric(lab, 1, "tcpmesh_tcp_received_bytes_total", **labels) == final["sent"]  # counted once
    assert metric(lab, 1, "tcpmesh_tcp_open_connections", **labels) == 0


def test_a_denied_connection_counts_as_failed_on_both_nodes(tlab):
    lab = tlab
    deadline = time.monotonic() + POLL  # the policy was written when the lab came up
    while True:
        result = lab.run_client("n1p2", f"{lab.pod('n2p2').ip}:{DENIED_PORT}", 100, "digest", name="tm-denied")
        assert not result.get("complete"), result
        flows = [f for f in lab.flows(1) if f["comm"] == "tm-denied" and f["response_flags"] == "DENY"]
        if flows:
            break
        assert time.monotonic() < deadline, "the DENY policy was never applied"
        time.sleep(0.5)
    flow = flows[0]
    assert flow["policy"] == "lab/no-7399"
    labels = {**pair(lab, "n1p2", "n2p2"), "response_flags": "DENY"}
    assert metric(lab, 1, "tcpmesh_tcp_connections_failed_total", reporter="source", **labels) >= 1
    assert metric(lab, 2, "tcpmesh_tcp_connections_failed_total", reporter="destination", **labels) >= 1


def read_records(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, "rb")]


def test_the_audit_log_of_the_run_verifies_and_tampering_is_named(tlab, tmp_path):
    lab = tlab
    path = access_log_path(lab.node(1))
    deadline = time.monotonic() + 5
    while not any(r.get("comm") == "tm-denied" for r in read_records(path)):
        assert time.monotonic() < deadline, "the denied flow never reached the access log"
        time.sleep(0.1)
    key = audit_key_path(lab.node(1))
    ok = cli("audit", "verify", "--key", key, path)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: "), ok.stdout + ok.stderr
    records = read_records(path)
    long_flow = next(r for r in records if r.get("comm") == "tm-longflow")
    assert long_flow["event"] == "close" and long_flow["node"] == "node1" and long_flow["decision"] == "allow"
    assert long_flow["cgroup"] == lab.pod("n1p1").exec_cgroup and long_flow["uid"] == os.getuid()
    assert long_flow["source_ip"] == lab.pod("n1p1").ip and long_flow["destination_port"] == ECHO_PORT
    denied = next(r for r in records if r.get("comm") == "tm-denied")
    assert denied["decision"] == "deny" and denied["policy"] == "lab/no-7399" and denied["response_flags"] == "DENY"
    verify_audit_log_on_node2 = cli("audit", "verify", "--key", audit_key_path(lab.node(2)),
                                    access_log_path(lab.node(2)))
    assert verify_audit_log_on_node2.returncode == 0, verify_audit_log_on_node2.stdout

    lines = open(path, "rb").read().splitlines(keepends=True)
    target = next(i for i, r in enumerate(records) if r.get("comm") == "tm-longflow")
    changed = bytearray(lines[target])
    at = changed.index(b'"bytes_received":') + len(b'"bytes_received":')
    changed[at] = ord("9") if changed[at] != ord("9") else ord("8")  # one byte: the byte count
    cases = {
        "changed": (lines[:target] + [bytes(changed)] + lines[target + 1:], f"{target + 1}"),
        "removed": (lines[:target] + lines[target + 1:], f"seq {records[target]['seq']} removed"),
        "reordered": (lines[:target] + [lines[target + 1], lines[target]] + lines[target + 2:],
                      f"seq {records[target]['seq']} is at"),
    }
    for kind, (tampered, named) in cases.items():
        copy = tmp_path / f"{kind}.log"
        copy.write_bytes(b"".join(tampered))
        out = cli("audit", "verify", "--key", key, str(copy))
        assert out.returncode == 1, f"{kind}: {out.stdout}"
        assert f"FAILED ({kind})" in out.stdout and named in out.stdout, f"{kind}: {out.stdout}"


def stats_labels(lab: Lab, reporter: str, leg: str, src: str, dst: str) -> dict[str, str]:
    return {"reporter": reporter, "leg": leg, "source_workload": src, "destination_workload": dst,
            **pair(lab, src, dst)}


def test_kernel_tcp_health_per_identity_pair_and_loss_raises_only_that_pairs_retransmits(tlab):
    lab = tlab
    for node, reporter in ((1, "source"), (2, "destination")):
        for leg in ("app", "tunnel"):
            labels = stats_labels(lab, reporter, leg, "n1p1", "n2p1")
            assert metric(lab, node, "tcpmesh_tcp_rtt_seconds_count", **labels) > 0, f"node{node} {leg}: no RTT"
            assert metric(lab, node, "tcpmesh_tcp_rtt_seconds_sum", **labels) > 0
    before = {node: metric(lab, node, "tcpmesh_tcp_retransmits_total", source_workload="n1p1",
                           destination_workload="n2p1") for node in (1, 2)}
    lossy = stats_labels(lab, "source", "tunnel", "n1p1", "n2p2")
    lab.start_server("n2p2", LOSSY_PORT, "echo")
    nft = ["ip", "netns", "exec", lab.node(2).netns, "nft"]
    subprocess.run([*nft, "add table ip tmloss"], check=True)
    try:  # 10 % of the tunnel's data segments from node1 vanish on their way into node2
        subprocess.run([*nft, "add chain ip tmloss pre { type filter hook prerouting priority 0 ; }"], check=True)
        subprocess.run([*nft, f"add rule ip tmloss pre tcp dport 15008 meta length > 200 "
                              "numgen random mod 100 < 10 drop"], check=True)
        for _ in range(5):  # losses are random: another 2 MiB flow of the pair until one was retransmitted
            result = lab.run_client("n1p1", f"{lab.pod('n2p2').ip}:{LOSSY_PORT}", 2 * 1024 * 1024, "echo",
                                    name="tm-lossy")
            assert result["complete"] and result["received_sha256"] == result["sent_sha256"], result
            if metric(lab, 1, "tcpmesh_tcp_retransmits_total", **lossy) > 0:
                break
    finally:
        subprocess.run([*nft, "delete table ip tmloss"], check=True)
    assert metric(lab, 1, "tcpmesh_tcp_retransmits_total", **lossy) > 0, "no retransmits seen for the lossy pair"
    assert metric(lab, 1, "tcpmesh_tcp_rtt_seconds_count", **lossy) > 0
    after = {node: metric(lab, node, "tcpmesh_tcp_retransmits_total", source_workload="n1p1",
                          destination_workload="n2p1") for node in (1, 2)}
    assert after == before, "retransmits rose for a pair that saw no loss"


def test_prometheus_scrapes_the_agents_and_every_dashboard_query_returns_data(tlab):
    lab, prom = tlab, tlab.prometheus
    src, dst = lab.pod("n1p1").spiffe_id, lab.pod("n2p1").spiffe_id
    expected = sum(f["bytes_received"] for f in lab.flows(1)
                   if f["end_time"] and f["source_principal"] == src and f["destination_principal"] == dst)
    assert expected > 0
    promql = (f'sum(tcpmesh_tcp_received_bytes_total{{reporter="source",source_principal="{src}",'
              f'destination_principal="{dst}"}})')
    assert prom.wait_value(promql, float(expected)) == expected
    dashboard = json.load(open(DASHBOARD))
    failures = []
    deadline = time.monotonic() + 15.0  # rate() and increase() need two scrapes of a series that may be new
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", "1m").replace("$__range", "10m")
                    .replace('"$instance"', '".*"'))
            while True:
                result = prom.query(expr)
                values = [float(s["value"][1]) for s in result]
                if (values and not all(math.isnan(v) for v in values)) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not values or all(math.isnan(v) for v in values):
                failures.append(f"{panel['title']} [{target['refId']}]: {expr} -> {result}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)


def test_the_series_of_a_removed_workload_disappear(tlab):
    lab = tlab
    assert 'source_workload="n1p2"' in lab.admin_get(1, "/metrics").decode()  # from the denied flow
    assert 'source_workload="n1p2"' in lab.admin_get(2, "/metrics").decode()
    path = lab.plan.registry_file
    original = open(path).read()
    doc = yaml.safe_load(original)
    doc["workloads"] = [w for w in doc["workloads"] if w["name"] != "n1p2"]
    try:
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(doc, f)
        os.replace(path + ".tmp", path)
        deadline = time.monotonic() + POLL
        while any("n1p2" in lab.admin_get(node, "/metrics").decode() for node in (1, 2)):
            assert time.monotonic() < deadline, "series of the removed workload n1p2 are still exported"
            time.sleep(0.2)
        assert 'source_workload="n1p1"' in lab.admin_get(1, "/metrics").decode()  # the others stay
    finally:
        with open(path + ".tmp", "w") as f:
            f.write(original)
        os.replace(path + ".tmp", path)


def test_after_all_of_the_above_neither_ebpf_connect_agent_has_loaded_pyroute2(tlab):
    """Last in this file: the agents have attached capture and the kernel TCP stats, relayed, denied, reported to
    Prometheus and applied registry changes (each a read of the node's own addresses). tests/integration's footprint
    test sees an agent in capture mode none only. Seen failing with pyroute2 imported by the ebpf-connect capture."""
    _, state = labops.load_lab(tlab.name)
    assert state["capture_mode"] == "ebpf-connect", state["capture_mode"]
    for node in tlab.plan.nodes:
        pid = state["agents"][node.name]["pid"]
        mapped = pyroute2_mapped(pid)
        assert not mapped, f"{node.name}'s agent (pid {pid}) {PYROUTE2_LOADED}: {mapped[0]}"
