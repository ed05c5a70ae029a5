"""Metrics of a flow's life: opened, live bytes, failed, open gauge, handshake; and the removal of a
departed workload's series (bounded cardinality)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from agent.connection import flow as F
from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.telemetry.metrics import OPEN_LABEL_COUNT, OPEN_LABELS, Metrics


def a_flow(src="web", dst="db", reporter=F.REPORTER_SOURCE) -> F.Flow:
    flow = F.Flow(reporter, ConnectionFacts(flow_id=bytes.fromhex("ab" * 8)), security=F.SECURITY_MTLS)
    flow.source_workload, flow.source_namespace = src, "shop"
    flow.source_principal = f"spiffe://td/ns/shop/sa/{src}"
    flow.destination_workload, flow.destination_namespace = dst, "data"
    flow.destination_principal = f"spiffe://td/ns/data/sa/{dst}"
    return flow


def value(metrics: Metrics, name: str, flow: F.Flow, **overrides) -> float:
    labels = {**flow.metric_labels(), **overrides}
    if name == "tcpmesh_tcp_open_connections":
        labels.pop("response_flags")
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_bytes_are_counted_while_the_flow_is_open_and_exactly_once_in_total():
    metrics = Metrics(CollectorRegistry())
    flow = a_flow()
    metrics.flow_opened(flow)
    assert value(metrics, "tcpmesh_tcp_open_connections", flow) == 1
    flow.bytes_received, flow.bytes_sent = 1000, 10
    metrics.flow_progress(flow)
    assert value(metrics, "tcpmesh_tcp_received_bytes_total", flow) == 1000
    flow.bytes_received, flow.bytes_sent = 2500, 30
    metrics.flow_progress(flow)
    metrics.flow_progress(flow)  # nothing new: nothing counted
    assert value(metrics, "tcpmesh_tcp_received_bytes_total", flow) == 2500
    flow.bytes_received = 3000
    metrics.flow_closed(flow)
    assert value(metrics, "tcpmesh_tcp_received_bytes_total", flow) == 3000
    assert value(metrics, "tcpmesh_tcp_sent_bytes_total", flow) == 30
    assert value(metrics, "tcpmesh_tcp_connections_closed_total", flow) == 1
    assert value(metrics, "tcpmesh_tcp_open_connections", flow) == 0
    assert value(metrics, "tcpmesh_tcp_connections_failed_total", flow) == 0


def test_a_flow_that_fails_mid_stream_counts_as_failed_and_its_gauge_returns_to_zero():
    metrics = Metrics(CollectorRegistry())
    flow = a_flow()
    metrics.flow_opened(flow)
    flow.bytes_received = 5
    metrics.flow_progress(flow)
    flow.fail(F.FLAG_CONNECTION_TERMINATED, "reset")
    flow.bytes_received = 7
    metrics.flow_closed(flow)
    assert value(metrics, "tcpmesh_tcp_connections_failed_total", flow) == 1
    assert value(metrics, "tcpmesh_tcp_open_connections", flow) == 0  # the open gauge ignores flags
    # live bytes stay under the labels they had; the rest lands under the final flags
    assert value(metrics, "tcpmesh_tcp_received_bytes_total", flow, response_flags="-") == 5
    assert value(metrics, "tcpmesh_tcp_received_bytes_total", flow) == 2


def test_a_refused_connection_is_failed_but_never_opened_or_closed():
    metrics = Metrics(CollectorRegistry())
    flow = a_flow(reporter=F.REPORTER_DESTINATION)
    flow.fail(F.FLAG_DENY, "policy shop/deny-all")
    metrics.flow_closed(flow)
    assert value(metrics, "tcpmesh_tcp_connections_failed_total", flow) == 1
    assert value(metrics, "tcpmesh_tcp_connections_closed_total", flow) == 0
    assert "tcpmesh_tcp_received_bytes_total{" not in generate_latest(metrics.registry).decode()


def test_the_handshake_is_observed_once_per_flow():
    metrics = Metrics(CollectorRegistry())
    flow = a_flow()
    flow.handshake_seconds = 0.003
    metrics.flow_opened(flow)
    metrics.handshake(flow)
    metrics.handshake(flow)
    metrics.flow_closed(flow)
    labels = {"reporter": "source"}
    get = metrics.registry.get_sample_value
    assert get("tcpmesh_tunnel_handshake_duration_seconds_count", labels) == 1
    assert get("tcpmesh_tunnel_handshake_duration_seconds_bucket", {**labels, "le": "0.005"}) == 1
    assert get("tcpmesh_tunnel_handshake_duration_seconds_bucket", {**labels, "le": "0.0025"}) == 0
    assert get("tcpmesh_tunnel_handshake_duration_seconds_count", {"reporter": "destination"}) == 0  # present


def test_a_departed_workloads_series_are_removed_but_not_while_its_flow_is_open():
    metrics = Metrics(CollectorRegistry())
    metrics.retain([("shop", "web"), ("data", "db"), ("shop", "cart")])
    done, still_open, other = a_flow(), a_flow(src="cart"), a_flow(src="web", dst="db")
    for flow in (done, still_open):
        metrics.flow_opened(flow)
    metrics.flow_closed(done)
    before = metrics.series_count()
    metrics.retain([("shop", "web"), ("data", "db")])  # cart leaves the node while its flow is open
    text = generate_latest(metrics.registry).decode()
    assert 'source_workload="cart"' in text
    still_open.bytes_received = 9
    metrics.flow_progress(still_open)
    metrics.flow_closed(still_open)  # the last flow of the departed workload: its series go now
    text = generate_latest(metrics.registry).decode()
    assert 'source_workload="cart"' not in text
    assert 'source_workload="web"' in text and metrics.series_count() < before + 3
    metrics.retain([])
    assert "tcpmesh_tcp_connections_opened_total{" not in generate_latest(metrics.registry).decode()
    assert other.open


def test_metric_labels_never_carry_addresses_or_processes():
    metrics = Metrics(CollectorRegistry())
    flow = a_flow()
    flow.facts = ConnectionFacts("10.77.2.11", 5432, flow.facts.flow_id, "10.77.1.11", 40000, ClientProcess(4242, 0, "psql"))
    metrics.flow_opened(flow)
    metrics.flow_closed(flow)
    text = generate_latest(metrics.registry).decode()
    assert "10.77." not in text and "psql" not in text and "4242" not in text


def test_metric_values_are_the_labels_in_order_and_open_series_drop_only_the_flags():
    flow = a_flow()
    flow.response_flags = F.FLAG_DENY
    assert flow.metric_values() == tuple(flow.metric_labels()[name] for name in F.METRIC_LABELS)
    assert OPEN_LABELS == F.METRIC_LABELS[:OPEN_LABEL_COUNT] and F.METRIC_LABELS[-1] == "response_flags"


def test_a_removed_series_comes_back_when_its_workload_returns():
    """The labelled children are kept between flows; removing a series must drop the kept child too."""
    metrics = Metrics(CollectorRegistry())
    first = a_flow(src="cart")
    metrics.flow_opened(first)
    metrics.flow_closed(first)
    metrics.retain([("data", "db")])  # cart left: its series go
    assert 'source_workload="cart"' not in generate_latest(metrics.registry).decode()
    metrics.retain([("data", "db"), ("shop", "cart")])  # and came back
    again = a_flow(src="cart")
    metrics.flow_opened(again)
    metrics.flow_closed(again)
    assert value(metrics, "tcpmesh_tcp_connections_opened_total", again) == 1
    assert value(metrics, "tcpmesh_tcp_connections_closed_total", again) == 1
    assert value(metrics, "tcpmesh_tcp_open_connections", again) == 0
