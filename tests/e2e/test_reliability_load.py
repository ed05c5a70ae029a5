"""Load through the mesh on a 2-node lab (ebpf-connect capture, real agents), marker ``load``:

- 5,000 connections held open at once, each echoing every 2 s: all succeed; the data path's memory
  (both agents' RSS growth) stays within a stated bound per connection;
- 1 GiB of random data over 50 parallel flows: every sha256 matches at the far end;
- 100,000 short connections in parallel (50 at a time) and SEQUENTIAL ones one after another:
  afterwards the agents hold no more file descriptors, asyncio tasks or BPF map entries than before
  (every expected map present, each back to its baseline within MAP_SLACK entries).

The lab routes pods directly, so each test also proves its connections went through both agents
(tests/e2e/mesh_witness.py): counted on both nodes, all mutual_tls, exact byte counts, node1's connect
hook capturing exactly that many connects and never missing an origin.

The sequential run is 50,000 connections, not 100,000: one at a time the mesh does ~770 connections/s
on this 2-core machine (measured, docs/reliability.md), so 100,000 would take ~2.2 minutes alone and
push the load tier past its ~4 minute budget.
TCPMESH_LOAD_FULL=1 runs the full 100,000. TCPMESH_RELIABILITY_FIGURES=<file> appends each test's
figures there as JSON lines (how docs/reliability.md was filled in).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.e2e.mesh_witness import expect_through_both_agents, reading
from tests.e2e.reliability_apps import MESSAGE
from tests.e2e.reliability_lab import DIGEST_PORT, figures, reliability_lab, wait_until

pytestmark = pytest.mark.load

HELD = 5000
HOLD_INTERVAL = 2.0
HOLD_SECONDS = 8.0
RSS_BOUND_KIB_PER_CONNECTION = 32  # both agents together; measured ~15 KiB (docs/reliability.md)
BULK_FLOWS, BULK_BYTES = 50, 1 << 30
PARALLEL, PARALLEL_COUNT = 50, 100_000
SEQUENTIAL_COUNT = 100_000 if os.environ.get("TCPMESH_LOAD_FULL") == "1" else 50_000
SETTLE_SECONDS = 30
# Allowed difference after a run: an idle pooled tunnel may be open or not (one socket, one task each side).
FD_SLACK, TASK_SLACK = 2, 2
# Map entries allowed above the baseline after a run: records of connections still closing.
MAP_SLACK = 8
# The pinned hash-like maps of an ebpf-connect node (docs/capture.md): a missing one checks nothing.
EXPECTED_MAPS = {"tcpmesh_cookie_origin", "tcpmesh_peer_origin", "tcpmesh_proxy_conns", "tcpmesh_stats_socks",
                 "tcpmesh_capture_cidrs", "tcpmesh_inbound_mode", "tcpmesh_plaintext"}
CLIENT, SERVER = "n1p1", "n2p1"


@pytest.fixture(scope="module")
def lab(bpf_capable):
    with reliability_lab("ld") as lab:
        lab.start_server()
        warm = lab.run("crr", "--count", "200", "--parallel", "10")
        assert warm["completed"] == 200, warm
        yield lab


def readings(lab) -> dict:
    """What must not grow: fds, asyncio and connection tasks, relays, and BPF map entries, per node."""
    out = {}
    for index in (1, 2):
        metrics = lab.metrics(index)
        out[index] = {"fds": lab.fds(index), "rss_kib": lab.rss_kib(index), "tasks": metrics["tcpmesh_agent_asyncio_tasks"],
                      "connection_tasks": metrics["tcpmesh_agent_connection_tasks"],
                      "relays": metrics["tcpmesh_agent_relays"], "maps": lab.map_counts(index)}
    return out


def quiet(lab) -> dict | None:
    """Readings once nothing relays and two readings a report interval apart agree."""
    first = readings(lab)
    time.sleep(2.5)  # tcpmesh_agent_* runtime figures are sampled every telemetry.report_interval_seconds
    second = readings(lab)
    keys = ("fds", "tasks", "connection_tasks", "relays")
    if all(first[i]["relays"] == 0 and {k: first[i][k] for k in keys} == {k: second[i][k] for k in keys}
           for i in (1, 2)):
        return second
    return None


def settled(lab, before: dict) -> dict | None:
    now = readings(lab)
    for index in (1, 2):
        if now[index]["relays"] or now[index]["fds"] > before[index]["fds"] + FD_SLACK or \
                now[index]["tasks"] > before[index]["tasks"] + TASK_SLACK or \
                now[index]["connection_tasks"] > before[index]["connection_tasks"] + TASK_SLACK:
            return None
    return now


def test_5000_connections_held_open_and_echoing_within_a_memory_bound(lab):
    idle = {i: lab.rss_kib(i) for i in (1, 2)}
    before = reading(lab, CLIENT, SERVER)
    client = lab.client("hold", "--count", str(HELD), "--interval", str(HOLD_INTERVAL))
    opened = json.loads(client.stdout.readline())
    assert opened["held"] == HELD and opened["failed"] == 0, opened
    time.sleep(HOLD_SECONDS)
    held = {i: lab.rss_kib(i) for i in (1, 2)}
    fds = {i: lab.fds(i) for i in (1, 2)}
    relays = {i: lab.metrics(i)["tcpmesh_agent_relays"] for i in (1, 2)}
    out, _ = client.communicate("", timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    growth = sum(held.values()) - sum(idle.values())
    figures("hold", held=HELD, open_seconds=opened["open_seconds"], exchanges=result["exchanges"],
            rss_idle_kib=idle, rss_held_kib=held, kib_per_connection=round(growth / HELD, 2), fds_held=fds,
            relays=relays)
    assert result["opened"] == HELD and result["lost"] == 0 and result["bad_exchanges"] == 0, result
    assert result["exchanges"] >= HELD * (1 + HOLD_SECONDS / HOLD_INTERVAL / 2), result  # every one echoed again
    assert all(fds[i] >= HELD for i in (1, 2)), fds  # they were really open through both agents at once
    assert growth / HELD <= RSS_BOUND_KIB_PER_CONNECTION, (idle, held)
    echoed = result["exchanges"] * MESSAGE
    expect_through_both_agents(lab, before, CLIENT, SERVER, connections=HELD, received=echoed, sent=echoed,
                               timeout=60)


def test_1_gib_over_50_parallel_flows_arrives_intact(lab):
    size = BULK_BYTES // BULK_FLOWS
    before = reading(lab, CLIENT, SERVER)
    result = lab.run("bulk", "--flows", str(BULK_FLOWS), "--bytes", str(size), port=DIGEST_PORT)
    figures("bulk", **{k: result[k] for k in ("flows", "matched", "bytes", "seconds", "mbit_s")})
    assert result["matched"] == BULK_FLOWS, result
    reply = len(f"{'0' * 64} {size}\n")  # the digest server's answer: "<sha256 hex> <length>\n"
    flows = expect_through_both_agents(lab, before, CLIENT, SERVER, connections=BULK_FLOWS,
                                       received=BULK_FLOWS * size, sent=BULK_FLOWS * reply, flows=True)
    assert sorted((f["bytes_received"], f["bytes_sent"]) for f in flows) == [(size, reply)] * BULK_FLOWS


def test_short_connections_in_sequence_and_in_parallel_leave_nothing_behind(lab):
    before = wait_until(lambda: quiet(lab), SETTLE_SECONDS)
    assert before, readings(lab)
    for index in (1, 2):
        assert EXPECTED_MAPS <= before[index]["maps"].keys(), f"node{index}: maps {sorted(before[index]['maps'])}"
    path_before = reading(lab, CLIENT, SERVER)
    sequential = lab.run("crr", "--count", str(SEQUENTIAL_COUNT), "--parallel", "1", timeout=400)
    parallel = lab.run("crr", "--count", str(PARALLEL_COUNT), "--parallel", str(PARALLEL), timeout=400)
    after = wait_until(lambda: settled(lab, before), SETTLE_SECONDS)
    final = after or readings(lab)
    figures("short", sequential={k: sequential[k] for k in ("completed", "failed", "rate", "p50_ms", "p99_ms")},
            parallel={k: parallel[k] for k in ("completed", "failed", "rate", "p50_ms", "p99_ms")},
            before=before, after=final)
    assert sequential["completed"] == SEQUENTIAL_COUNT, sequential
    assert parallel["completed"] == PARALLEL_COUNT, parallel
    assert after, f"the agents did not return to where they were: before {before}, after {final}"
    for index in (1, 2):
        assert final[index]["maps"].keys() == before[index]["maps"].keys(), (index, before, final)
        for name, was in before[index]["maps"].items():
            now = final[index]["maps"][name]
            assert now["entries"] <= was["entries"] + MAP_SLACK, f"node{index} {name}: {was} before, {now} after"
    total = SEQUENTIAL_COUNT + PARALLEL_COUNT
    expect_through_both_agents(lab, path_before, CLIENT, SERVER, connections=total, received=total * MESSAGE,
                               sent=total * MESSAGE, timeout=60)
    for index in (1, 2):  # the data path refused nothing meanwhile
        assert "tcpmesh_connection_limit_hits_total" in lab.get(index, "/metrics")
        assert lab.metric_sum(index, "tcpmesh_connection_limit_hits_total") == 0
