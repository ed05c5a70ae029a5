"""SIGTERM with connections in flight (docs/reliability.md "Stopping with connections open"), on a
2-node lab with real agents (ebpf-connect) and a drain of ``DRAIN`` seconds
(``TCPMESH_PROXY_DRAIN_SECONDS``, ``proxy.drain_seconds``).

n1p1 holds 3 echoing connections and an idle one to n2p1, n1p2 holds 2 echoing ones; node1's agent
(the source side) gets SIGTERM, or node2's (the destination side). While it drains:
/readyz answers 503 "stopping", a new connect of a pod is refused (ECONNREFUSED: capture stays, the
listener is closed; with the destination node's agent stopping, a new stream on a tunnel already open
is still served), the open connections keep working, and n1p2's, closed by their client, end
cleanly. At the end of the drain n1p1's are reset (the client reads ECONNRESET) and the agent exits 0.
Every one of the 6 connections has exactly one close record in the stopped agent's access log — with its bytes
and its result: ``-`` for the ones that ended during the drain, ``DC`` "agent shutting down" for the
reset ones — and the other node closed each of them too.

The two cases share one lab: before each, an agent that is not serving (the one the case before stopped) is
started again with the same drain, and a connection must be meshed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path

import pytest

from agent.lab.files import access_log_path
from agent.lab.nsenter import http_get_in_netns
from tests.e2e.reliability_apps import MESSAGE
from tests.e2e.reliability_lab import reliability_lab, wait_until

DRAIN = 8.0  # long enough to close n1p2's connections inside it on a loaded machine; nothing is timed
ENV = {"TCPMESH_PROXY_DRAIN_SECONDS": str(DRAIN)}


@pytest.fixture(scope="module")
def shared_lab(bpf_capable):
    """One lab for both cases (a lab build is ≈ 15-35 s; an agent's restart a third of it)."""
    with reliability_lab("sd", pods_per_node=2, env=ENV) as lab:
        lab.start_server("n2p1")
        yield lab


@pytest.fixture
def lab(shared_lab):
    """The shared lab with both agents running: the agent an earlier case stopped (or left draining, if it
    failed) is started again — with the same drain setting — and a connection is meshed before the case begins;
    the case's clients are stopped after it, the server is kept."""
    for index in (1, 2):
        if not serving(shared_lab, index):
            shared_lab.restart_agent(index)
    assert shared_lab.run("probe")["result"] == "ok"
    server = len(shared_lab.apps)
    yield shared_lab
    clients, shared_lab.apps[server:] = shared_lab.apps[server:], []
    for proc in clients:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def readyz(lab, index: int) -> tuple[int, str]:
    node = lab.node(index)
    status, body = http_get_in_netns(node.netns, f"http://{node.admin_address}/readyz")
    return status, body.decode()


def serving(lab, index: int) -> bool:
    """The node's agent answers /readyz with 200 (not gone, not draining)."""
    try:
        return readyz(lab, index)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def close_records(path: str) -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_bytes().splitlines()) if r.get("event") == "close"]


def open_flows(lab, index: int, client: str) -> dict[str, dict]:
    return {f["flow_id"]: f for f in lab.flows(index) if f["source_workload"] == client and f["end_time"] is None}


@pytest.mark.parametrize("stopped", [1, 2], ids=["source-node", "destination-node"])
def test_sigterm_drains_then_resets_and_every_connection_gets_one_record(lab, stopped):
    other = 3 - stopped
    kept = lab.client("hold", "--count", "3", "--interval", "0.2", pod="n1p1")
    ending = lab.client("hold", "--count", "2", "--interval", "0.2", pod="n1p2")
    for client in (kept, ending):
        held = json.loads(client.stdout.readline())
        assert held["failed"] == 0, held
    silent = lab.client("idle", "--timeout", "120", pod="n1p1")  # blocked in read(): sees RST or FIN as such
    assert wait_until(lambda: len(open_flows(lab, 1, "n1p1")) == 4, 10), lab.flows(1)
    kept_ids, ending_ids = set(open_flows(lab, 1, "n1p1")), set(open_flows(lab, 1, "n1p2"))
    assert len(ending_ids) == 2, lab.flows(1)
    log_path = access_log_path(lab.node(stopped))

    pid = lab.agent_pid(stopped)
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: readyz(lab, stopped) == (503, "not ready: stopping\n"), 10), readyz(lab, stopped)

    # draining: no new connection, the open ones work, and those their clients close end cleanly
    # (source node: its listener is closed, capture stays; destination node: a stream on a tunnel already
    # open is still served — and would be drained with the rest; a new tunnel would be refused)
    probe = lab.run("probe", "--timeout", "5", pod="n1p1")
    assert probe["result"] == ("ConnectionRefusedError(111)" if stopped == 1 else "ok"), probe
    ending.stdin.close()
    ended = json.loads(ending.stdout.readline())
    assert ended["lost"] == 0 and ended["bad_exchanges"] == 0, ended
    assert kept_ids <= set(open_flows(lab, stopped, "n1p1")), "the drain cut connections before its end"

    # the drain's end: the rest are reset, the agent exits 0
    _, status = os.waitpid(pid, 0)  # lab up started it from this process
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"agent exit status {status:#x}"
    assert json.loads(silent.communicate(timeout=30)[0])["result"] == "ConnectionResetError(104)"
    kept.stdin.close()
    reset = json.loads(kept.stdout.readline())  # uvloop: writing to a reset connection raises RuntimeError
    assert reset["lost"] == 3 and set(reset["errors"]) <= {"ConnectionResetError(104)", "RuntimeError"}, reset

    records = close_records(log_path)
    for flow_id in kept_ids | ending_ids:
        mine = [r for r in records if r["flow_id"] == flow_id]
        assert len(mine) == 1, f"flow {flow_id}: {len(mine)} close records in node{stopped}'s log, not 1: {mine}"
        record = mine[0]
        # bytes as far as they went: an echo may have been in flight when the reset came
        assert 0 <= record["bytes_received"] - record["bytes_sent"] <= MESSAGE, record
        assert record["bytes_received"] % MESSAGE == record["bytes_sent"] % MESSAGE == 0, record
        if flow_id in ending_ids:
            assert record["response_flags"] == "-", record
        else:
            assert record["response_flags"] == "DC" and "agent shutting down" in record["detail"], record

    def closed_on_the_other_node() -> bool:
        return all(f["end_time"] is not None for f in lab.flows(other) if f["flow_id"] in kept_ids | ending_ids)

    assert wait_until(closed_on_the_other_node, 10), [f for f in lab.flows(other) if f["end_time"] is None]
