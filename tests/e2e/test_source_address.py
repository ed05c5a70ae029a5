"""Servers see the client pod's own address through the mesh (issue 16, part 2), in every capture mode.

Real PostgreSQL 15 and Redis in pods of node 2; their own clients (psql, redis-cli) in pods of node 1
and, for the same-node path, of node 2. PostgreSQL's ``inet_client_addr()`` and Redis's ``CLIENT
LIST`` name the client pod's address, not the node's (169.254.1.1 before); a ``pg_hba.conf`` that
admits exactly one pod's address lets that pod in through the mesh and turns another away with
PostgreSQL's own "no entry for host <that pod's address>" — the rule a database administrator writes.
The agents run with the default ``proxy.source_address: auto`` and say so in their log.
"""

from __future__ import annotations

import uuid

import pytest

from agent.lab import lab as labops
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
        only_allowed = (f"host all all {lab.pod(ALLOWED).ip}/32 trust", "host all all 0.0.0.0/0 reject")
        servers.append(Postgres(lab, PG_POD, hba=only_allowed))
        servers[-1].start()
        servers.append(Redis(lab, REDIS_POD))
        servers[-1].start()
        yield lab
    finally:
        for server in servers:
            server.stop()
        labops.lab_down(name)


def psql(lab, pod: str, sql: str):
    return run(in_pod(lab, pod), [f"{PG_BIN}/psql", "-h", lab.pod(PG_POD).ip, "-p", str(PG_PORT), "-U", "postgres",
                                  "-d", "postgres", "-X", "-A", "-t", "-c", sql], timeout=30)


def redis_client_list(lab, pod: str) -> str:
    result = run(in_pod(lab, pod), ["redis-cli", "-h", lab.pod(REDIS_POD).ip, "-p", str(REDIS_PORT),
                                    "CLIENT", "LIST"], timeout=30)
    assert result.returncode == 0, result.output
    return result.output


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
