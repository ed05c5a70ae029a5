"""Real workloads through the mesh, unchanged (issue #9): PostgreSQL 15 and Redis on node 2 driven by
their own load tools (pgbench, redis-benchmark, psql, redis-cli) from a pod on node 1, and a
server-speaks-first protocol. Proves: zero failed transactions and no client errors; no SQL text,
Redis command or greeting in clear on the wire between nodes; both nodes attribute every connection
to the client's and server's SPIFFE IDs and to the client process; a DENY policy
makes the clients fail fast, and lifting it restores them. Also measures throughput through the mesh
against the same run without it (docs/benchmarks.md, "Real workloads").

Run alone with ``pytest -m real_workloads``. ``TCPMESH_BENCH_REPORT=FILE`` writes the measurements
as JSON. The lab's capture mode is pinned to ebpf-connect: the baseline relies on a process outside
the pod cgroup not being captured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import lab as labops
from agent.lab.sniff import PacketCapture
from tests.e2e.real_workloads import (PG_BIN, PG_PORT, REDIS_PORT, Postgres, Redis, access_records, beside_pod,
                                      geometric_mean, in_pod, parse_pgbench, parse_redis_benchmark, real_workloads_lab,
                                      run)

pytestmark = pytest.mark.real_workloads

CLIENT, PG_POD, REDIS_POD, MAIL_POD = "n1p1", "n2p1", "n2p2", "n2p3"
ACCOUNTS = {CLIENT: "shop", PG_POD: "postgres", REDIS_POD: "redis", MAIL_POD: "mail"}
BANNER_PORT = 2525  # an arbitrary port: nothing in the agents' configuration mentions it
REJECT_PORT = 2526  # greets and closes at once, as an SMTP server refusing service (554) or MySQL a blocked host
PGBENCH_SECONDS = 10
REDIS_TESTS = ("set", "get", "lrange_100", "mset")  # strings, lists (with LRANGE_100's LPUSH), MSET; all 20 take ~25 s
FAIL_FAST = 2.0  # seconds for a denied client to give up, process start included
RELOAD = 10.0  # policy poll interval (2 s) with generous slack for a loaded machine
MARK = uuid.uuid4().hex[:12]
GREETING = f"220 mail.example ESMTP tcpmesh-greeting-{MARK}"
REJECTION = "554 mail.example no service for you"
REJECT_SERVER = f"""
import socket
listener = socket.create_server(("0.0.0.0", {REJECT_PORT}), backlog=16)
print("listening", flush=True)
while True:
    conn, _ = listener.accept()
    conn.sendall(b"{REJECTION}\\r\\n")
    conn.close()
"""


@pytest.fixture(scope="module")
def rw_lab(bpf_capable):
    with real_workloads_lab("rw", 3, "rw.tcpmesh", ACCOUNTS) as (lab, servers):
        servers.append(Postgres(lab, PG_POD))
        servers[-1].start()
        servers.append(Redis(lab, REDIS_POD))
        servers[-1].start()
        banner = labops.lab_exec(lab.name, MAIL_POD, [sys.executable, "-m", "agent.demo.sampleapps", "server",
                                                      "--port", str(BANNER_PORT), "--mode", "banner", "--greeting",
                                                      GREETING, "--name", "mail-server"],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        lab.apps.append(banner)
        assert "listening" in banner.stdout.readline()
        reject = labops.lab_exec(lab.name, MAIL_POD, [sys.executable, "-c", REJECT_SERVER], stdout=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True)
        lab.apps.append(reject)
        assert "listening" in reject.stdout.readline()
        yield lab


@pytest.fixture(scope="module")
def report():
    measurements: dict = {}
    yield measurements
    path = os.environ.get("TCPMESH_BENCH_REPORT")
    if path and measurements:
        with open(path, "w") as f:
            json.dump(measurements, f, indent=2, sort_keys=True)


def ip(lab, pod: str) -> str:
    return lab.pod(pod).ip


def pgbench(lab, *args: str) -> list[str]:
    return [f"{PG_BIN}/pgbench", "-h", ip(lab, PG_POD), "-p", str(PG_PORT), "-U", "postgres", *args, "postgres"]


def psql(lab, sql: str) -> list[str]:
    return [f"{PG_BIN}/psql", "-h", ip(lab, PG_POD), "-p", str(PG_PORT), "-U", "postgres", "-d", "postgres",
            "-X", "-A", "-t", "-c", sql]


def redis_benchmark(lab, test: str, *args: str) -> list[str]:
    return ["redis-benchmark", "-h", ip(lab, REDIS_POD), "-p", str(REDIS_PORT), "-q", "-n", "20000", "-t", test, *args]


def redis_cli(lab, *args: str) -> list[str]:
    return ["redis-cli", "-h", ip(lab, REDIS_POD), "-p", str(REDIS_PORT), *args]


def banner_client(lab, marker: str = "", name: str = "mail-client") -> list[str]:
    return [sys.executable, "-m", "agent.demo.sampleapps", "client", "--connect", f"{ip(lab, MAIL_POD)}:{BANNER_PORT}",
            "--mode", "banner", "--bytes", "4096", "--marker", marker, "--timeout", "5", "--name", name]


def closed_flows(lab, node: int, port: int, since: float, comm: str | None = None, minimum: int = 1,
                 timeout: float = 10.0) -> list[dict]:
    """Closed flows to ``port`` that started after ``since`` (and, on the source node, from ``comm``)."""
    deadline = time.monotonic() + timeout
    while True:
        flows = [f for f in lab.flows(node) if f["destination_port"] == port and f["start_time"] >= since
                 and f["end_time"] is not None and (comm is None or f["comm"] == comm)]
        if len(flows) >= minimum or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


def assert_attributed(lab, port: int, since: float, comm: str, server_pod: str, minimum: int) -> None:
    """Both nodes name client and server by SPIFFE ID in flows, access log and metrics, and the client
    process in flows and access log (node 2 as node 1's capture saw it, carried by the tunnel)."""
    client_id, server_id = lab.pod(CLIENT).spiffe_id, lab.pod(server_pod).spiffe_id
    src = closed_flows(lab, 1, port, since, comm, minimum)
    assert len(src) >= minimum, f"node1 has {len(src)} closed {comm} flows to :{port}, expected >= {minimum}"
    others = [f for f in closed_flows(lab, 1, port, since, minimum=0, timeout=0) if f["comm"] != comm]
    assert not others, f"flows to :{port} not attributed to {comm}: {others[:3]}"
    for flow in src:
        assert (flow["source_principal"], flow["destination_principal"]) == (client_id, server_id), flow
        assert flow["security"] == "mutual_tls" and flow["response_flags"] == "-", flow
        assert flow["pid"], flow
    ids = {f["flow_id"] for f in src}
    dst = {f["flow_id"]: f for f in closed_flows(lab, 2, port, since, minimum=len(src)) if f["flow_id"] in ids}
    assert set(dst) == ids, f"node2 is missing {len(ids - set(dst))} of node1's {len(ids)} flows"
    for flow in dst.values():
        assert (flow["source_principal"], flow["destination_principal"]) == (client_id, server_id), flow
        assert flow["comm"] == comm and flow["pid"] == next(f["pid"] for f in src if f["flow_id"] == flow["flow_id"]), flow

    for node in (1, 2):
        deadline = time.monotonic() + 5
        while True:
            logged = {r["flow_id"]: r for r in access_records(lab.node(node)) if r["flow_id"] in ids}
            if len(logged) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(logged) == ids, f"node{node}'s access log lacks {len(ids - set(logged))} of {len(ids)} flows"
        for record in logged.values():
            assert (record["source_principal"], record["destination_principal"]) == (client_id, server_id), record
            assert record["comm"] == comm and record["pid"], record

    for node, reporter in ((1, "source"), (2, "destination")):
        closed = 0.0
        text = lab.admin_get(node, "/metrics").decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if (sample.name == "tcpmesh_tcp_connections_closed_total" and labels.get("reporter") == reporter
                        and labels.get("source_principal") == client_id
                        and labels.get("destination_principal") == server_id
                        and labels.get("connection_security_policy") == "mutual_tls"):
                    closed += sample.value
        assert closed >= len(ids), f"node{node} counted {closed} closed {reporter} connections, expected >= {len(ids)}"


def assert_not_captured(lab, port: int, since: float) -> None:
    """The baseline really bypassed the mesh: node1 saw no flow to ``port`` while it ran."""
    flows = [f for f in lab.flows(1) if f["destination_port"] == port and f["start_time"] >= since]
    assert not flows, f"the baseline went through the mesh: {flows[:2]}"


# ------------------------------------------------------------------------------------------- tests

def test_pgbench_through_the_mesh_has_no_failed_transactions(rw_lab, report):
    lab = rw_lab
    init = run(in_pod(lab, CLIENT), pgbench(lab, "-i", "-q"), timeout=120)
    assert init.returncode == 0 and "done in" in init.output, init.output[-2000:]

    since = time.time()
    meshed = run(in_pod(lab, CLIENT), pgbench(lab, "-T", str(PGBENCH_SECONDS), "-c", "8"),
                 timeout=PGBENCH_SECONDS + 60)
    assert meshed.returncode == 0, meshed.output[-2000:]
    mesh = parse_pgbench(meshed.output)
    assert mesh.failed == 0 and mesh.processed > 0, meshed.output[-2000:]
    assert_attributed(lab, PG_PORT, since, "pgbench", PG_POD, minimum=8)

    since = time.time()
    direct_run = run(beside_pod(lab, CLIENT), pgbench(lab, "-T", str(PGBENCH_SECONDS), "-c", "8"),
                     timeout=PGBENCH_SECONDS + 60)
    assert direct_run.returncode == 0, direct_run.output[-2000:]
    direct = parse_pgbench(direct_run.output)
    assert direct.failed == 0, direct_run.output[-2000:]
    assert_not_captured(lab, PG_PORT, since)
    report["pgbench"] = {"args": f"-T {PGBENCH_SECONDS} -c 8 (scale 1, fsync=off)", "mesh_tps": mesh.tps,
                         "direct_tps": direct.tps, "ratio": round(mesh.tps / direct.tps, 3),
                         "mesh_transactions": mesh.processed}


def test_redis_benchmark_through_the_mesh_has_no_errors(rw_lab, report):
    """Each test runs meshed and direct back to back (plain, then -P 16), so load drift on a shared
    machine hits both sides of a ratio alike."""
    lab = rw_lab
    results: dict[str, dict[str, float]] = {"mesh": {}, "direct": {}, "mesh_pipelined": {}, "direct_pipelined": {}}
    for test in REDIS_TESTS:
        for label, launch, extra in (("mesh", in_pod(lab, CLIENT), ()), ("direct", beside_pod(lab, CLIENT), ()),
                                     ("mesh_pipelined", in_pod(lab, CLIENT), ("-P", "16")),
                                     ("direct_pipelined", beside_pod(lab, CLIENT), ("-P", "16"))):
            since = time.time()
            done = run(launch, redis_benchmark(lab, test, *extra), timeout=120)
            rates, errors = parse_redis_benchmark(done.output)
            assert done.returncode == 0 and rates and not errors, \
                f"{label} {test}: rc={done.returncode} {errors[:5]} {done.output[-1000:]}"
            results[label].update(rates)
            if label == "mesh" and test == REDIS_TESTS[0]:  # 50 connections; the first run is enough
                assert_attributed(lab, REDIS_PORT, since, "redis-benchmark", REDIS_POD, minimum=50)
            if label.startswith("direct"):
                assert_not_captured(lab, REDIS_PORT, since)
    assert all(len(rates) == len(REDIS_TESTS) + 1 for rates in results.values()), results  # + LRANGE's LPUSH
    report["redis"] = {"args": f"-q -n 20000 -t <each of {','.join(REDIS_TESTS)}>", **{
        kind: {"per_test_ratio": {t: round(results[kind][t] / results[f"direct{suffix}"][t], 3) for t in results[kind]},
               "geomean_ratio": round(geometric_mean([results[kind][t] / results[f"direct{suffix}"][t]
                                                       for t in results[kind]]), 3),
               "mesh_rps": results[kind], "direct_rps": results[f"direct{suffix}"]}
        for kind, suffix in (("mesh", ""), ("mesh_pipelined", "_pipelined"))}}


def test_a_server_that_speaks_first_works_with_no_per_port_configuration(rw_lab):
    lab = rw_lab
    for node in lab.plan.nodes:
        with open(node.config_file) as f:
            assert str(BANNER_PORT) not in f.read(), "the agents must know nothing about the banner port"
    since = time.time()
    done = run(in_pod(lab, CLIENT), banner_client(lab), timeout=30)
    result = json.loads(done.output.strip().splitlines()[-1])
    assert "error" not in result, f"the greeting never reached the client (a mesh waiting for client bytes?): {result}"
    assert result["greeting"] == GREETING
    assert result["complete"] and result["reply"].split() == [result["sent_sha256"], "4096"], result
    assert done.seconds < FAIL_FAST + 1, f"server-first exchange took {done.seconds:.2f}s"
    src = closed_flows(lab, 1, BANNER_PORT, since, "mail-client")
    assert src and src[0]["destination_principal"] == lab.pod(MAIL_POD).spiffe_id, src
    assert src[0]["bytes_sent"] >= len(GREETING) and src[0]["security"] == "mutual_tls", src[0]

    # A server that greets and closes before the client says anything: the greeting arrives, then EOF.
    rejected = run(in_pod(lab, CLIENT), [sys.executable, "-c", textwrap.dedent(f"""\
        import socket
        sock = socket.create_connection(("{ip(lab, MAIL_POD)}", {REJECT_PORT}), timeout=5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        print(data.decode().strip())
        """)], timeout=30)
    assert rejected.returncode == 0 and rejected.output.strip() == REJECTION, rejected.output


def test_the_wire_between_nodes_carries_no_sql_redis_command_or_greeting(rw_lab):
    lab = rw_lab
    node1 = lab.node(1)

    def exchange(launch, tag: str) -> dict[str, bytes]:
        sql = f"SELECT 'tcpmesh-sql-{tag}-{MARK}' AS marker"
        key, value = f"tcpmesh-key-{tag}-{MARK}", f"tcpmesh-value-{tag}-{MARK}"
        query = run(launch, psql(lab, sql), timeout=30)
        assert query.returncode == 0 and f"tcpmesh-sql-{tag}-{MARK}" in query.output, query.output
        assert run(launch, redis_cli(lab, "SET", key, value), timeout=30).output.strip() == "OK"
        got = run(launch, redis_cli(lab, "GET", key), timeout=30)
        assert got.output.strip() == value, got.output
        greeted = json.loads(run(launch, banner_client(lab, marker=f"tcpmesh-mail-{tag}-{MARK}"), timeout=30)
                             .output.strip().splitlines()[-1])
        assert greeted.get("greeting") == GREETING, greeted
        return {"SQL text": sql.encode(), "Redis command": f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n".encode(),
                "Redis value": value.encode(), "greeting": GREETING.encode(),
                "mail payload": f"tcpmesh-mail-{tag}-{MARK}".encode()}

    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        secrets = exchange(in_pod(lab, CLIENT), "mesh")
    segments = capture.tcp_segments()
    wire = b"".join(s.payload for s in segments)
    assert b"\x17\x03\x03" in wire, "no TLS application-data records on the wire"
    for what, text in secrets.items():
        assert text not in wire, f"{what} crossed the wire in clear: {text!r}"
    assert not [s for s in segments if {s.sport, s.dport} & {PG_PORT, REDIS_PORT, BANNER_PORT}], \
        "an application port appeared on the wire: traffic bypassed the tunnel"

    # The control: the same exchange without the mesh is visible to this capture, so the check above means something.
    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        secrets = exchange(beside_pod(lab, CLIENT), "direct")
    wire = b"".join(s.payload for s in capture.tcp_segments())
    for what, text in secrets.items():
        assert text in wire, f"control: the unmeshed {what} was not captured, so the capture proves nothing"


def test_a_deny_policy_makes_the_clients_fail_fast_and_lifting_it_restores_them(rw_lab):
    lab = rw_lab
    path = f"{lab.plan.state_dir}/policies/deny-shop.yaml"
    policy = textwrap.dedent(f"""\
        kind: AuthorizationPolicy
        metadata: {{name: deny-shop, namespace: lab}}
        spec:
          action: DENY
          rules:
            - from: [{{principals: ["{lab.pod(CLIENT).spiffe_id}"]}}]
        """)
    client = in_pod(lab, CLIENT)
    try:
        with open(path + ".tmp", "w") as f:
            f.write(policy)
        os.replace(path + ".tmp", path)
        wait_until(lambda: run(client, redis_cli(lab, "PING"), timeout=10).output.strip() != "PONG", RELOAD,
                   "the DENY policy was not applied")
        since = time.time()
        for argv, comm, port in ((pgbench(lab, "-T", "2", "-c", "2"), "pgbench", PG_PORT),
                                 (psql(lab, "SELECT 1"), "psql", PG_PORT),
                                 (redis_cli(lab, "PING"), "redis-cli", REDIS_PORT)):
            denied = run(client, argv, timeout=30)
            assert denied.returncode != 0, f"{comm} succeeded while denied: {denied.output}"
            assert denied.seconds < FAIL_FAST, f"{comm} took {denied.seconds:.2f}s to fail (must fail fast)"
            assert any(words in denied.output for words in
                       ("server closed the connection", "Connection reset by peer", "Server closed the connection")), \
                f"{comm} did not fail with a connection error: {denied.output}"
            flows = closed_flows(lab, 2, port, since)
            assert flows and all(f["response_flags"] == "DENY" and f["policy"] == "lab/deny-shop" for f in flows), flows
            src = closed_flows(lab, 1, port, since, comm)
            assert src and src[-1]["response_flags"] == "DENY", src
    finally:
        if os.path.exists(path):
            os.unlink(path)
    wait_until(lambda: run(client, redis_cli(lab, "PING"), timeout=10).output.strip() == "PONG", RELOAD,
               "removing the DENY policy did not restore access")
    restored = run(client, pgbench(lab, "-T", "1", "-c", "2"), timeout=60)
    assert restored.returncode == 0 and parse_pgbench(restored.output).failed == 0, restored.output[-2000:]
    assert run(client, psql(lab, "SELECT 41 + 1"), timeout=30).output.strip() == "42"


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)
