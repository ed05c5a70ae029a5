"""Services on the lab (issue #16 part 1): real Redis and PostgreSQL behind one virtual address whose
endpoints run on two nodes, dialled by their own clients from a meshed pod and from a pod that is not
meshed (the node's kube-proxy-like DNAT, `tcpmesh lab service`).

Proves: redis-benchmark and pgbench through the Service have no errors and reach both endpoints over
mTLS, with destination_service on every flow; an endpoint turned not ready gets no new connections
while a connection already open to it keeps working; a Service with no ready endpoint fails the
client at once (UH); a pod outside the mesh still reaches the Service; the wire carries no Redis
command in clear.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from agent.lab import lab as labops
from agent.lab.services import lab_service_set, service_document
from agent.lab.sniff import PacketCapture
from tests.e2e.real_workloads import (PG_BIN, PG_PORT, REDIS_PORT, Postgres, Redis, beside_pod, in_pod,
                                      parse_pgbench, parse_redis_benchmark, real_workloads_lab, run)

pytestmark = pytest.mark.real_workloads

CLIENT, EP1, EP2 = "n1p1", "n1p2", "n2p1"  # endpoints on node1 and node2
UNMESHED = "n2p2"
ACCOUNTS = {CLIENT: "shop", EP1: "store", EP2: "store", UNMESHED: "batch"}
REDIS_VIP, PG_VIP = "10.96.0.20", "10.96.0.21"
RELOAD = 15.0  # registry poll with slack for a loaded machine
FAIL_FAST = 2.0


@pytest.fixture(scope="module")
def svc_lab(bpf_capable):
    with real_workloads_lab("sv", 2, "svc.tcpmesh", ACCOUNTS) as (lab, servers):
        for pod in (EP1, EP2):
            servers.append(Redis(lab, pod))
            servers[-1].start()
            servers.append(Postgres(lab, pod))
            servers[-1].start()
        set_endpoints(lab, "redis", REDIS_VIP, REDIS_PORT, {EP1: True, EP2: True})
        set_endpoints(lab, "pg", PG_VIP, PG_PORT, {EP1: True, EP2: True})
        for pod in (EP1, EP2):  # each PostgreSQL gets pgbench's tables, by its pod address
            init = run(in_pod(lab, CLIENT), [f"{PG_BIN}/pgbench", "-h", lab.pod(pod).ip, "-p", str(PG_PORT),
                                             "-U", "postgres", "-i", "-q", "postgres"], timeout=120)
            assert init.returncode == 0, init.output[-2000:]
        wait_service_routed(lab, REDIS_VIP, REDIS_PORT)
        yield lab


def set_endpoints(lab, service: str, vip: str, port: int, ready: dict[str, bool]) -> None:
    lab_service_set(lab.plan, service_document(lab.plan, service, [vip], [(port, port)], list(ready.items())))


def redis_cli(vip: str, *args: str) -> list[str]:
    return ["redis-cli", "-h", vip, "-p", str(REDIS_PORT), *args]


def service_flows(lab, service: str, since: float) -> list[dict]:
    return [f for f in lab.flows(1) if f.get("destination_service_name") == service and f["start_time"] >= since]


def wait_service_routed(lab, vip: str, port: int) -> None:
    """Until node1's agent has the Service: a PONG alone proves nothing (the node's DNAT answers too)."""
    since = time.time()
    deadline = time.monotonic() + RELOAD
    while True:
        run(in_pod(lab, CLIENT), redis_cli(vip, "PING"), timeout=10)
        if service_flows(lab, "redis", since) or time.monotonic() > deadline:
            assert service_flows(lab, "redis", since), f"node1's agent never routed the Service {vip}"
            return
        time.sleep(0.5)


def wait_for(condition, message: str, timeout: float = RELOAD) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.3)


def test_redis_benchmark_through_a_service_reaches_both_nodes_with_mtls(svc_lab):
    lab = svc_lab
    since = time.time()
    done = run(in_pod(lab, CLIENT), ["redis-benchmark", "-h", REDIS_VIP, "-p", str(REDIS_PORT), "-q", "-n", "5000",
                                     "-c", "10", "-t", "set,get"], timeout=120)
    rates, errors = parse_redis_benchmark(done.output)
    assert done.returncode == 0 and rates and not errors, done.output[-1000:]

    def flows_to_service() -> list[dict]:  # redis-benchmark's connections (one per client), by node1's proxy
        return [f for f in service_flows(lab, "redis", since) if f["comm"] == "redis-benchmark"]
    wait_for(lambda: {f["destination_workload"] for f in flows_to_service()} == {EP1, EP2},
             "redis-benchmark's connections did not reach both endpoints", timeout=30)
    flows = flows_to_service()
    assert {f["destination_workload"] for f in flows} == {EP1, EP2}, flows[:3]
    for flow in flows:
        assert flow["security"] == "mutual_tls" and flow["response_flags"] == "-", flow
        assert flow["destination_service"] == f"redis.{lab.plan.namespace}.svc.cluster.local", flow
        assert flow["destination_port"] == REDIS_PORT and flow["destination_ip"] in (lab.pod(EP1).ip, lab.pod(EP2).ip)
    metrics = lab.metrics_text(1)
    assert 'destination_service_name="redis"' in metrics


def test_pgbench_through_a_service_has_no_failed_transactions(svc_lab):
    lab = svc_lab
    since = time.time()
    done = run(in_pod(lab, CLIENT), [f"{PG_BIN}/pgbench", "-h", PG_VIP, "-p", str(PG_PORT), "-U", "postgres",
                                     "-T", "5", "-c", "4", "postgres"], timeout=90)
    assert done.returncode == 0, done.output[-2000:]
    result = parse_pgbench(done.output)
    assert result.failed == 0 and result.processed > 0, done.output[-2000:]
    flows = [f for f in service_flows(lab, "pg", since) if f["comm"] == "pgbench"]
    assert {f["destination_workload"] for f in flows} == {EP1, EP2}, flows[:3]


def test_a_pod_outside_the_mesh_reaches_the_service_through_the_nodes_dnat(svc_lab):
    lab = svc_lab
    since = time.time()
    done = run(beside_pod(lab, UNMESHED), redis_cli(REDIS_VIP, "PING"), timeout=10)
    assert "PONG" in done.output, done.output
    assert not [f for f in lab.flows(2) if f["start_time"] >= since and f["reporter"] == "source"]


def test_the_wire_carries_no_redis_command_through_the_service(svc_lab):
    """Four SETs alternate between the endpoints, so two cross to node2; the control without the mesh
    (the node's DNAT) shows the capture sees such a command in clear."""
    lab = svc_lab
    node1 = lab.node(1)

    def sets(launch, tag: str) -> bytes:
        key = f"svc-{tag}-{uuid.uuid4().hex[:10]}"
        for _ in range(4):
            assert "OK" in run(launch, redis_cli(REDIS_VIP, "SET", key, "v"), timeout=10).output
        return key.encode()

    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        key = sets(in_pod(lab, CLIENT), "mesh")
    wire = b"".join(s.payload for s in capture.tcp_segments())
    assert b"\x17\x03\x03" in wire and key not in wire, "a Redis command to the Service crossed the wire in clear"
    with PacketCapture(node1.netns, node1.wire_ifname) as capture:
        key = sets(beside_pod(lab, CLIENT), "direct")
    assert key in b"".join(s.payload for s in capture.tcp_segments()), "control: the unmeshed SET was not seen"


def test_not_ready_endpoint_gets_no_new_connections_and_keeps_its_open_one(svc_lab):
    lab = svc_lab
    held = [None]
    try:
        # one open connection per endpoint (round robin), kept open across the change
        procs = [labops.lab_exec(lab.name, CLIENT, redis_cli(REDIS_VIP), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        held[0] = procs
        for proc in procs:
            proc.stdin.write("CLIENT SETNAME held\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "OK"
        set_endpoints(lab, "redis", REDIS_VIP, REDIS_PORT, {EP1: True, EP2: False})

        def only_ep1() -> bool:
            since = time.time()
            for _ in range(3):
                run(in_pod(lab, CLIENT), redis_cli(REDIS_VIP, "PING"), timeout=10)
            return {f["destination_workload"] for f in service_flows(lab, "redis", since)} == {EP1}
        wait_for(only_ep1, f"{EP2} still gets new connections after it was marked not ready")
        since = time.time()
        for _ in range(6):
            assert "PONG" in run(in_pod(lab, CLIENT), redis_cli(REDIS_VIP, "PING"), timeout=10).output
        assert {f["destination_workload"] for f in service_flows(lab, "redis", since)} == {EP1}
        for proc in procs:  # both held connections, the one to EP2 included, still answer
            proc.stdin.write("PING\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "PONG"
    finally:
        for proc in held[0] or []:
            proc.kill()
            proc.wait()
        set_endpoints(lab, "redis", REDIS_VIP, REDIS_PORT, {EP1: True, EP2: True})


def test_a_service_with_no_ready_endpoint_fails_fast_with_uh(svc_lab):
    lab = svc_lab
    set_endpoints(lab, "redis", REDIS_VIP, REDIS_PORT, {EP1: False, EP2: False})
    try:
        def refused() -> bool:
            return "PONG" not in run(in_pod(lab, CLIENT), redis_cli(REDIS_VIP, "PING"), timeout=10).output
        wait_for(refused, "the Service still answers with no ready endpoint")
        since = time.time()
        started = time.monotonic()
        done = run(in_pod(lab, CLIENT), redis_cli(REDIS_VIP, "PING"), timeout=10)
        assert time.monotonic() - started < FAIL_FAST and "PONG" not in done.output, done.output
        wait_for(lambda: any(f["response_flags"] == "UH" for f in service_flows(lab, "redis", since)),
                 "node1 recorded no UH flow")
        assert "UH" in lab.metrics_text(1)
    finally:
        set_endpoints(lab, "redis", REDIS_VIP, REDIS_PORT, {EP1: True, EP2: True})
