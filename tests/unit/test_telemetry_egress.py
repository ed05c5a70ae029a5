"""Connects outside the mesh reported by the kernel become an access record and a counter
(agent.telemetry.egress), attributed to the workload whose cgroup (or an ancestor) made them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.capture.egress import EgressEvent
from agent.registry.model import Node, Registry, Workload
from agent.telemetry.egress import EgressReport, owner_of
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics

POD = "/sys/fs/cgroup/k/pods/pod1"


def registry() -> Registry:
    return Registry.build("td", [Node("node1", "10.76.0.1")],
                          [Workload("web", "shop", "web", "10.77.1.10", "node1", POD, "td"),
                           Workload("db", "shop", "db", "10.77.2.10", "node2", "/elsewhere", "td")])


def test_the_owner_is_the_workload_whose_cgroup_is_the_callers_or_an_ancestor():
    assert owner_of(registry(), "node1", POD).name == "web"
    assert owner_of(registry(), "node1", POD + "/container-a").name == "web"
    assert owner_of(registry(), "node1", POD + "-other") is None  # a sibling with a common prefix
    assert owner_of(registry(), "node1", "/elsewhere") is None    # not a workload of this node
    assert owner_of(None, "node1", POD) is None and owner_of(registry(), "node1", None) is None


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def submit(self, record: dict) -> None:
        self.records.append(record)


class Names:
    def name(self, cgroup_id: int) -> str | None:
        return {11: POD + "/container-a"}.get(cgroup_id)


def test_an_event_becomes_one_egress_record_and_a_counted_decision():
    sink, prom = Sink(), CollectorRegistry()
    metrics = Metrics(prom)
    report = EgressReport("node1", registry, Names(), FlowTable(access_log=sink), metrics)
    report.on_event(EgressEvent(cgroup_id=11, pid=4242, uid=0, comm="curl", destination_ip="192.0.2.1",
                                destination_port=443, denied=True))
    report.on_event(EgressEvent(cgroup_id=99, pid=7, uid=0, comm="nc", destination_ip="192.0.2.2",
                                destination_port=80, denied=False))
    denied, allowed = sink.records
    assert (denied["event"], denied["decision"], denied["source_workload"], denied["pid"], denied["comm"]) == \
        ("egress", "deny", "web", 4242, "curl")
    assert (denied["destination_ip"], denied["destination_port"], denied["security"]) == ("192.0.2.1", 443, "none")
    assert (allowed["decision"], allowed["source_workload"]) == ("allow", "unknown")
    labels = {"source_workload": "web", "source_workload_namespace": "shop",
              "source_principal": "spiffe://td/ns/shop/sa/web", "decision": "deny"}
    assert prom.get_sample_value("tcpmesh_egress_outside_mesh_total", labels) == 1.0
