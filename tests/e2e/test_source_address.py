"""Servers see the client pod's own address through the mesh (issue 16, part 2), in every capture mode,
and its own IPv6 address over IPv6 (the dual-stack lab; ebpf-connect, the mode that meshes IPv6).

Real PostgreSQL 15 and Redis in pods of node 2; their own clients (psql, redis-cli) in pods of node 1
and, for the same-node path, of node 2. PostgreSQL's ``inet_client_addr()`` and Redis's ``CLIENT
LIST`` name the client pod's address, not the node's (169.254.1.1 before); a ``pg_hba.conf`` that
admits exactly one pod's address lets that pod in through the mesh and turns another away with
PostgreSQL's own "no entry for host <that pod's address>" — the rule a database administrator writes.
The agents run with the default ``proxy.source_address: auto`` and say so in their log. Over IPv6 the
pod's reply to its client's borrowed address must come back to the agent (the IPv6 fwmark rule and
``local ::/0`` table): the tests watch both nodes' wire ports — the connection completes, nothing but
the tunnel crosses, never a packet to or from the client pod's IPv6 address.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.capture import steering
from agent.lab import lab as labops
from agent.lab.errors import LabError
from agent.lab.nsenter import popen_in
from agent.lab.sniff import PacketCapture
from tests.conftest import skip_or_fail
from tests.e2e.conftest import CAPTURE_MODES, Lab
from tests.e2e.real_workloads import PG_BIN, PG_PORT, REDIS_PORT, Postgres, Redis, in_pod, missing_tools, run

pytestmark = pytest.mark.real_workloads

ALLOWED, OTHER, PG_POD, REDIS_POD = "n1p1", "n1p2", "n2p1", "n2p2"
ACCOUNTS = {ALLOWED: "shop", OTHER: "other", PG_POD: "postgres", REDIS_POD: "redis"}


@pytest.fixture(scope="module", params=CAPTURE_MODES)
def sa_lab(request, bpf_capable):
    problem = missing_tools()
    if problem:
        skip_or_fail(problem)
    name = f"sa{uuid.uuid4().hex[:6]}"
    lab, servers = None, []
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "sa.tcpmesh", service_accounts=ACCOUNTS,
                                      capture_mode=request.param), request.param)
        only_allowed = (f"host all all {lab.pod(ALLOWED).ip}/32 trust", "host all all 0.0.0.0/0 reject",
                        f"host all all {lab.pod(ALLOWED).ip6}/128 trust", "host all all ::/0 reject")
        servers.append(Postgres(lab, PG_POD, hba=only_allowed))
        servers[-1].start()
        servers.append(Redis(lab, REDIS_POD))
        servers[-1].start()
        yield lab
    finally:
        for server in servers:
            server.stop()
        labops.lab_down(name)


# IPv6 to a workload is meshed by ebpf-connect only (docs/capture-connect.md, "Dual stack"): the IPv6
# tests take that mode's lab (the same module-scoped lab as the IPv4 tests' ebpf-connect run)
IPV6_LAB = pytest.mark.parametrize("sa_lab", ["ebpf-connect"], indirect=True)
EARLY_DEMUX = "net.ipv4.tcp_early_demux"  # per network namespace; IPv6 TCP follows it too


def psql(lab, pod: str, sql: str, family: int = 4):
    server = lab.pod(PG_POD).ip6 if family == 6 else lab.pod(PG_POD).ip
    return run(in_pod(lab, pod), [f"{PG_BIN}/psql", "-h", server, "-p", str(PG_PORT), "-U", "postgres",
                                  "-d", "postgres", "-X", "-A", "-t", "-c", sql], timeout=30)


def redis_client_list(lab, pod: str, family: int = 4) -> str:
    server = lab.pod(REDIS_POD).ip6 if family == 6 else lab.pod(REDIS_POD).ip
    result = run(in_pod(lab, pod), ["redis-cli", "-h", server, "-p", str(REDIS_PORT), "CLIENT", "LIST"], timeout=30)
    assert result.returncode == 0, result.output
    return result.output


def sysctl(netns: str, key: str, value: str | None = None) -> str:
    argv = ["ip", "netns", "exec", netns, "sysctl", "-n", key] if value is None else \
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout.strip()


def frames_with(frames: list[bytes], address: str) -> list[bytes]:
    """The IPv6 frames whose source or destination is ``address``."""
    raw = socket.inet_pton(socket.AF_INET6, address)
    return [f for f in frames if f[12:14] == b"\x86\xdd" and raw in (f[22:38], f[38:54])]


def test_the_agents_say_servers_see_the_pods_address(sa_lab):
    for node in sa_lab.plan.nodes:
        with open(node.log_file) as f:
            assert "servers see meshed connections from the client pod's own address" in f.read(), node.name


def test_postgres_sees_the_client_pods_address(sa_lab):
    result = psql(sa_lab, ALLOWED, "select host(inet_client_addr())")
    assert result.returncode == 0, result.output
    assert result.output.strip() == sa_lab.pod(ALLOWED).ip, result.output


def test_pg_hba_admits_one_pod_and_rejects_another_through_the_mesh(sa_lab):
    other = psql(sa_lab, OTHER, "select 1")
    assert other.returncode != 0, other.output
    assert f'pg_hba.conf rejects connection for host "{sa_lab.pod(OTHER).ip}"' in other.output, other.output
    allowed = psql(sa_lab, ALLOWED, "select 1")
    assert allowed.returncode == 0 and allowed.output.strip() == "1", allowed.output


def test_redis_client_list_shows_the_client_pods_address(sa_lab):
    listed = redis_client_list(sa_lab, ALLOWED)
    assert f"addr={sa_lab.pod(ALLOWED).ip}:" in listed, listed
    assert f"addr={sa_lab.plan.pod_gateway}:" not in listed, listed


def test_a_client_on_the_servers_own_node_keeps_its_address_too(sa_lab):
    listed = redis_client_list(sa_lab, PG_POD)
    assert f"addr={sa_lab.pod(PG_POD).ip}:" in listed, listed


# ---- IPv6 (dual stack) -----------------------------------------------------------------------------

@IPV6_LAB
def test_postgres_over_ipv6_sees_the_client_pods_ipv6_address(sa_lab):
    result = psql(sa_lab, ALLOWED, "select host(inet_client_addr())", family=6)
    assert result.returncode == 0, result.output
    assert result.output.strip() == sa_lab.pod(ALLOWED).ip6, result.output


@IPV6_LAB
def test_pg_hba_over_ipv6_admits_one_pods_address_and_rejects_another(sa_lab):
    other = psql(sa_lab, OTHER, "select 1", family=6)
    assert other.returncode != 0, other.output
    assert f'pg_hba.conf rejects connection for host "{sa_lab.pod(OTHER).ip6}"' in other.output, other.output
    allowed = psql(sa_lab, ALLOWED, "select 1", family=6)
    assert allowed.returncode == 0 and allowed.output.strip() == "1", allowed.output


@IPV6_LAB
def test_redis_client_list_over_ipv6_shows_the_client_pods_address(sa_lab):
    listed = redis_client_list(sa_lab, ALLOWED, family=6)
    assert f"addr=[{sa_lab.pod(ALLOWED).ip6}]:" in listed, listed


@IPV6_LAB
def test_a_client_on_the_servers_own_node_keeps_its_ipv6_address_too(sa_lab):
    listed = redis_client_list(sa_lab, PG_POD, family=6)
    assert f"addr=[{sa_lab.pod(PG_POD).ip6}]:" in listed, listed


@IPV6_LAB
def test_ipv6_replies_to_the_borrowed_address_never_leave_the_servers_node(sa_lab):
    """The pod answers its client's IPv6 address; that answer must reach the agent on the server's node
    (the return path), not be forwarded towards the client's node (an asymmetric path: the connection
    would hang, and the reply would cross the wire in plaintext). Only the tunnel crosses the wire.

    With TCP early demux on (the default) this kernel drops a reply it would forward to a local
    socket's 4-tuple (ip6_forward refuses an skb that has a socket), so a missing return path shows as
    a hang; the server's node runs with it off here — a setting operators do use — where the reply is
    forwarded and would be seen on the wire (seen so with the IPv6 pair left out: 10 datagrams forwarded)."""
    marker = f"V6-SOURCE-{uuid.uuid4().hex}"
    client6 = sa_lab.pod(ALLOWED).ip6
    server_node = sa_lab.node(2).netns
    wires = [PacketCapture(sa_lab.plan.wire_netns, node.bridge_port) for node in sa_lab.plan.nodes]
    demux = sysctl(server_node, EARLY_DEMUX)
    sysctl(server_node, EARLY_DEMUX, "0")
    for wire in wires:
        wire.start()
    try:
        result = psql(sa_lab, ALLOWED, f"select '{marker}', host(inet_client_addr())", family=6)
        time.sleep(0.3)
    finally:
        for wire in wires:
            wire.stop()
        sysctl(server_node, EARLY_DEMUX, demux)
    for node, wire in zip(sa_lab.plan.nodes, wires):
        assert wire.frames, f"nothing captured on {node.bridge_port}"
        leaked = len(frames_with(wire.frames, client6))
        assert leaked == 0, f"{leaked} IPv6 packet(s) to or from {client6} crossed {node.bridge_port}"
        assert sum(marker.encode() in frame for frame in wire.frames) == 0, f"plaintext on {node.bridge_port}"
    assert result.returncode == 0 and result.output.strip() == f"{marker}|{client6}", result.output


@IPV6_LAB
def test_where_the_kernel_refuses_the_ipv6_return_path_auto_falls_back_and_pod_refuses_to_start(sa_lab):
    """The documented fallback: the server's node refuses the IPv6 pair (IPv6 off on its lo). With
    auto its agent says so and IPv6 servers see the node's address (the connection still completes;
    IPv4 servers still see the pod's), and `tcpmesh doctor` on that node says the same; with pod the
    agent refuses to start, naming the IPv6 return path and the fix, and leaves no steering object."""
    node = sa_lab.node(2)
    original = Path(node.config_file).read_text()
    sysctl(node.netns, "net.ipv6.conf.lo.disable_ipv6", "1")
    try:
        labops.lab_restart_agent(sa_lab.name, node.name)
        log = Path(node.log_file).read_text()
        assert "IPv6 servers will see the node's address" in log and "disable_ipv6=0" in log, log[-3000:]
        assert "the client pod's own address (IPv4; IPv6 servers see this node's address)" in log, log[-3000:]
        listed = redis_client_list(sa_lab, ALLOWED, family=6)
        assert f"addr=[{node.wire_address6}]:" in listed, listed
        doctor = popen_in([sys.executable, "-m", "agent", "doctor", "--json", "--config", node.config_file],
                          netns=node.netns, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        report = json.loads(doctor.communicate(timeout=180)[0])
        source = report["source_address"]
        assert (source["selected"], source["ipv6"]["selected"], source["ipv6"]["missing"]) == \
            ("pod", "node", ["policy_routing6"]), source
        probe = next(check for check in report["checks"] if check["name"] == "policy_routing6")
        assert "net.ipv6.conf.lo.disable_ipv6=1" in probe["error"], probe  # the node's lo, not a fresh netns'
        assert f"addr={sa_lab.pod(ALLOWED).ip}:" in redis_client_list(sa_lab, ALLOWED)

        config = yaml.safe_load(original)
        config.setdefault("proxy", {})["source_address"] = "pod"
        Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
        with pytest.raises(LabError, match="exited"):
            labops.lab_restart_agent(sa_lab.name, node.name)
        log = Path(node.log_file).read_text()
        assert "proxy.source_address is pod but the IPv6 return path cannot start" in log, log[-3000:]
        assert "set proxy.source_address to auto" in log, log[-3000:]
        assert steering.present(node.netns) == []
    finally:
        Path(node.config_file).write_text(original)
        sysctl(node.netns, "net.ipv6.conf.lo.disable_ipv6", "0")
        labops.lab_restart_agent(sa_lab.name, node.name)
    assert f"addr=[{sa_lab.pod(ALLOWED).ip6}]:" in redis_client_list(sa_lab, ALLOWED, family=6)
