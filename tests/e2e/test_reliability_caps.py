"""One identity at its connection cap while another keeps working, on a 2-node lab with real agents
(ebpf-connect) whose per-identity cap is lowered through the environment
(``TCPMESH_PROXY_MAX_CONNECTIONS_PER_IDENTITY``, ``proxy.max_connections_per_identity``).

n1p1 holds ``CAP`` connections to n2p1; every further connect of n1p1 is accepted by node1's outbound
proxy and reset at once — nothing is dialled — with a flow record flagged ``CONNECTION_LIMIT`` and
``tcpmesh_connection_limit_hits_total{reporter="source",limit="per_identity"}`` counting each one,
while n1p2 (another identity, same node, same destination) connects and exchanges without a single
failure, through both agents; n1p1's held connections keep echoing; once they close, n1p1 connects
again (docs/reliability.md "Time limits and caps").
"""

from __future__ import annotations

import json

import pytest

from agent.connection import flow as F
from tests.e2e.mesh_witness import expect_through_both_agents, reading
from tests.e2e.reliability_apps import MESSAGE
from tests.e2e.reliability_lab import reliability_lab, wait_until

CAP = 5
ENV = {"TCPMESH_PROXY_MAX_CONNECTIONS_PER_IDENTITY": str(CAP)}
HITS = "tcpmesh_connection_limit_hits_total"


@pytest.fixture(scope="module")
def lab(bpf_capable):
    with reliability_lab("cap", pods_per_node=2, env=ENV) as lab:
        lab.start_server("n2p1")
        assert lab.run("probe")["result"] == "ok"
        yield lab


def other_identity_works(lab, connections: int) -> None:
    """n1p2 opens and closes ``connections`` echo connections: all complete, all through both agents."""
    before = reading(lab, "n1p2", "n2p1")
    result = lab.run("crr", "--count", str(connections), pod="n1p2")
    assert result["completed"] == connections and result["failed"] == 0, result
    expect_through_both_agents(lab, before, "n1p2", "n2p1", connections=connections,
                               received=connections * MESSAGE, sent=connections * MESSAGE)


def test_an_identity_at_its_cap_is_refused_while_another_keeps_working(lab):
    other_identity_works(lab, 10)

    holder = lab.client("hold", "--count", str(CAP), "--interval", "0.5", pod="n1p1")
    held = json.loads(holder.stdout.readline())
    assert held["held"] == CAP and held["failed"] == 0, held
    hits = lab.metric_sum(1, HITS, reporter="source", limit="per_identity")
    refused_before = {f["flow_id"] for f in lab.flows(1) if f["response_flags"] == F.FLAG_CONNECTION_LIMIT}

    extra = lab.run("crr", "--count", "4", pod="n1p1")
    assert extra["completed"] == 0 and extra["failed"] == 4, f"n1p1 is past its cap of {CAP}: {extra}"
    assert set(extra["errors"]) == {"ConnectionResetError(104)"}, f"not reset at once: {extra}"
    assert lab.metric_sum(1, HITS, reporter="source", limit="per_identity") == hits + 4
    refused = [f for f in lab.flows(1) if f["response_flags"] == F.FLAG_CONNECTION_LIMIT
               and f["flow_id"] not in refused_before]
    assert len(refused) == 4, refused
    for flow in refused:
        assert flow["source_workload"] == "n1p1" and flow["bytes_received"] == flow["bytes_sent"] == 0, flow
        assert "max_connections_per_identity=5" in flow["detail"], flow

    other_identity_works(lab, 20)  # while n1p1 is still at its cap

    holder.stdin.close()
    held = json.loads(holder.stdout.readline())
    assert held["lost"] == 0 and held["bad_exchanges"] == 0 and held["exchanges"] >= CAP, held
    assert holder.wait(30) == 0
    wait_until(lambda: lab.metric_sum(1, "tcpmesh_tcp_open_connections", reporter="source",
                                      source_workload="n1p1") == 0, 10)
    again = lab.run("crr", "--count", "3", pod="n1p1")
    assert again["completed"] == 3 and again["failed"] == 0, f"n1p1's cap was not released: {again}"
