"""Proof that connections went through both agents, not pod to pod.

The lab routes pods to each other directly, so bytes arriving intact prove nothing about the mesh by
themselves: with capture broken (or ``capture.mode: none``) a data-integrity test still passes. A test
that claims the mesh carried its connections takes a ``reading`` before and calls
``expect_through_both_agents`` after, which requires, for the (client pod, server pod) pair:

- node1's outbound proxy (reporter ``source``) and node2's inbound proxy (reporter ``destination``)
  each opened and closed exactly ``connections`` flows, all ``mutual_tls`` with response flag ``-``,
  none failed, and counted exactly ``received`` / ``sent`` bytes (client → server / server → client);
- when ``flows`` is asked for (at most the agents' recent-flow ring, 1,024): each new flow is on both
  nodes under the same flow id with those exact byte counts;
- in ``ebpf-connect`` mode, node1's connect hook captured exactly ``connections`` connects and the
  getsockopt hook never missed an origin (``origin_missing`` unchanged).

The lab object needs: ``flows(i)``, ``metrics_text(i)``, ``pod(name)``, ``node(i)``, ``capture_mode``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from agent.capture.pinned import read_counters

OPENED, CLOSED, FAILED = ("tcpmesh_tcp_connections_opened_total", "tcpmesh_tcp_connections_closed_total",
                          "tcpmesh_tcp_connections_failed_total")
RECEIVED, SENT = "tcpmesh_tcp_received_bytes_total", "tcpmesh_tcp_sent_bytes_total"
PAIR_METRICS = (OPENED, CLOSED, FAILED, RECEIVED, SENT)
REPORTERS = {1: "source", 2: "destination"}


@dataclass(frozen=True)
class Reading:
    metrics: dict[int, dict[str, float]]   # node -> metric -> value for the pair, every flag and security
    mtls_ok: dict[int, dict[str, float]]   # the same, only mutual_tls with response flag "-"
    flow_ids: dict[int, frozenset[str]]
    counters: dict[str, int]               # node1's connect-hook reason counters ({} in other modes)


def reading(lab, client: str, server: str) -> Reading:
    metrics, mtls_ok, flow_ids = {}, {}, {}
    for node in (1, 2):
        metrics[node], mtls_ok[node] = _pair_metrics(lab.metrics_text(node), REPORTERS[node], client, server)
        flow_ids[node] = frozenset(f["flow_id"] for f in lab.flows(node))
    counters = read_counters(lab.node(1).bpffs_dir) if lab.capture_mode == "ebpf-connect" else {}
    return Reading(metrics, mtls_ok, flow_ids, counters)


def expect_through_both_agents(lab, before: Reading, client: str, server: str, *, connections: int, received: int,
                               sent: int, flows: bool = False, timeout: float = 30.0) -> list[dict]:
    """Wait until both agents closed the pair's new connections, then require the whole proof (above).
    Returns node1's new flow records when ``flows`` is asked for."""
    deadline = time.monotonic() + timeout
    while True:
        now = reading(lab, client, server)
        closed = [now.metrics[n].get(CLOSED, 0) - before.metrics[n].get(CLOSED, 0) for n in (1, 2)]
        if min(closed) >= connections or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for node in (1, 2):
        where = f"node{node} ({REPORTERS[node]} reporter), {client} -> {server}"
        delta = {m: now.metrics[node].get(m, 0) - before.metrics[node].get(m, 0) for m in PAIR_METRICS}
        ok = {m: now.mtls_ok[node].get(m, 0) - before.mtls_ok[node].get(m, 0) for m in PAIR_METRICS}
        assert delta[OPENED] == connections, f"{where}: {delta[OPENED]:.0f} connections opened, not {connections}" \
                                             " — did they go pod to pod, around the mesh?"
        assert ok[OPENED] == ok[CLOSED] == connections, f"{where}: not all mutual_tls and clean: {delta}, {ok}"
        assert delta[FAILED] == 0, f"{where}: {delta[FAILED]:.0f} failed"
        assert ok[RECEIVED] == received and ok[SENT] == sent, \
            f"{where}: {ok[RECEIVED]:.0f} bytes received / {ok[SENT]:.0f} sent, not {received} / {sent}"
    if before.counters or now.counters:
        captured = now.counters["captured"] - before.counters["captured"]
        assert captured == connections, f"node1's connect hook captured {captured} connects, not {connections}"
        assert now.counters["origin_missing"] == before.counters["origin_missing"], (before.counters, now.counters)
    return _matching_flows(lab, before, client, server, connections) if flows else []


def _matching_flows(lab, before: Reading, client: str, server: str, connections: int) -> list[dict]:
    def new(node: int) -> dict[str, dict]:
        return {f["flow_id"]: f for f in lab.flows(node) if f["flow_id"] not in before.flow_ids[node]
                and f["source_workload"] == client and f["destination_workload"] == server}

    source, destination = new(1), new(2)
    assert len(source) == connections, f"node1 shows {len(source)} new flows {client} -> {server}, not {connections}"
    assert source.keys() == destination.keys(), "node2 did not carry the same flows as node1"
    for flow_id, flow in source.items():
        other = destination[flow_id]
        assert flow["end_time"] is not None and other["end_time"] is not None, (flow, other)
        assert flow["security"] == other["security"] == "mutual_tls", (flow, other)
        assert flow["response_flags"] == other["response_flags"] == "-", (flow, other)
        assert (flow["bytes_received"], flow["bytes_sent"]) == (other["bytes_received"], other["bytes_sent"]), \
            (flow, other)
        assert flow["source_principal"] == other["source_principal"] == lab.pod(client).spiffe_id
        assert flow["destination_principal"] == other["destination_principal"] == lab.pod(server).spiffe_id
    return list(source.values())


def _pair_metrics(text: str, reporter: str, client: str, server: str) -> tuple[dict[str, float], dict[str, float]]:
    every: dict[str, float] = {}
    clean: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name not in PAIR_METRICS or labels.get("reporter") != reporter or \
                    labels.get("source_workload") != client or labels.get("destination_workload") != server:
                continue
            every[sample.name] = every.get(sample.name, 0) + sample.value
            if labels.get("connection_security_policy") == "mutual_tls" and labels.get("response_flags") == "-":
                clean[sample.name] = clean.get(sample.name, 0) + sample.value
    return every, clean
