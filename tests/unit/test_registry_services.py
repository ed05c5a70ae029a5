"""Services in the registry: the static file's `services:` section (errors name the field and the
fix), the outbound route through a Service address (a ready endpoint, round robin, its target port;
UH when none is ready), the flow's destination_service labels and the mesh destinations."""

import copy

import pytest

from agent.capture import abi
from agent.capture.meshdsts import in_mesh, lookup, mesh_entries, service_destinations, workload_destinations
from agent.connection import flow as F
from agent.connection.facts import ConnectionFacts
from agent.errors import ConfigError
from agent.proxy.balancer import RoundRobin
from agent.proxy.routing import RouteKind, dialled_service, route_outbound
from agent.registry.overlay import merge
from agent.registry.static_file import parse_registry

VIP = "10.96.0.10"
DOC = {
    "nodes": [{"name": "node1", "address": "10.76.0.1"}, {"name": "node2", "address": "10.76.0.2"},
              {"name": "node3", "address": "10.76.0.3"}],
    "workloads": [
        {"name": "web", "namespace": "shop", "service_account": "web", "ip": "10.77.1.10", "node": "node1"},
        {"name": "db-0", "namespace": "data", "service_account": "postgres", "ip": "10.77.2.10", "node": "node2"},
        {"name": "db-1", "namespace": "data", "service_account": "postgres", "ip": "10.77.3.10", "node": "node3"},
    ],
    "services": [
        {"name": "db", "namespace": "data", "addresses": [VIP, "fd00:96::10"],
         "ports": [{"port": 5432, "target_port": 15432}],
         "endpoints": [{"workload": "data/db-0"}, {"workload": "data/db-1", "ready": True}]},
    ],
}


def registry(doc=DOC):
    return parse_registry(doc, "td.example")


def test_a_service_address_reaches_ready_endpoints_in_turn_on_the_target_port():
    reg, rr = registry(), RoundRobin()
    routes = [route_outbound(reg, "node1", "10.77.1.10", VIP, 5432, 15008, rr) for _ in range(4)]
    assert all(r.kind is RouteKind.MESH and r.target_port == 15432 and r.service.key == "data/db" for r in routes)
    assert [r.destination.name for r in routes] == ["db-0", "db-1", "db-0", "db-1"]
    assert [r.tunnel_address for r in routes[:2]] == [("10.76.0.2", 15008), ("10.76.0.3", 15008)]
    six = route_outbound(reg, "node1", "10.77.1.10", "fd00:96::10", 5432, 15008, rr)
    assert six.kind is RouteKind.MESH and six.service.key == "data/db"


def test_an_endpoint_not_ready_gets_no_new_connections():
    doc = copy.deepcopy(DOC)
    doc["services"][0]["endpoints"][0]["ready"] = False
    reg, rr = registry(doc), RoundRobin()
    picked = {route_outbound(reg, "node1", "10.77.1.10", VIP, 5432, 15008, rr).destination.name for _ in range(5)}
    assert picked == {"db-1"}


def test_no_ready_endpoint_is_refused_with_uh_naming_the_service():
    doc = copy.deepcopy(DOC)
    for endpoint in doc["services"][0]["endpoints"]:
        endpoint["ready"] = False
    route = route_outbound(registry(doc), "node1", "10.77.1.10", VIP, 5432, 15008, RoundRobin())
    assert route.kind is RouteKind.REJECT and route.flag == F.FLAG_NO_HEALTHY_UPSTREAM == "UH"
    assert "data/db" in route.reason and "no ready endpoint" in route.reason


def test_a_port_the_service_does_not_declare_is_not_the_service():
    route = route_outbound(registry(), "node1", "10.77.1.10", VIP, 5433, 15008, RoundRobin())
    assert route.kind is RouteKind.REJECT and route.flag == F.FLAG_NO_ROUTE and route.service is None


def test_the_flow_carries_istios_destination_service_labels():
    route = route_outbound(registry(), "node1", "10.77.1.10", VIP, 5432, 15008, RoundRobin())
    flow = F.Flow(F.REPORTER_SOURCE)
    flow.set_destination(route.destination)
    flow.set_service(route.service)
    labels = flow.metric_labels()
    assert labels["destination_service"] == "db.data.svc.cluster.local"
    assert (labels["destination_service_name"], labels["destination_service_namespace"]) == ("db", "data")
    assert flow.metric_values() == tuple(labels[name] for name in F.METRIC_LABELS)
    assert F.Flow(F.REPORTER_SOURCE).metric_labels()["destination_service"] == F.UNKNOWN


def test_service_frontends_are_mesh_destinations_on_their_port_only():
    reg = registry()
    assert set(reg.service_frontends()) == {(VIP, 5432), ("fd00:96::10", 5432)}
    entries = mesh_entries(workload_destinations(w.ip for w in reg.workloads)
                           + service_destinations(reg.service_frontends()))
    assert lookup(entries, VIP, 5432) == abi.DST_SERVICE and in_mesh(entries, "fd00:96::10", 5432)
    assert not in_mesh(entries, VIP, 5433)


def test_runtime_workloads_keep_the_services():
    reg = registry()
    assert merge(reg, ()).services == reg.services


@pytest.mark.parametrize("mutate, words", [
    (lambda s: s.update(addresses=["10.96.0"]), r"services\[0\].addresses\[0\].*not an IP address"),
    (lambda s: s.update(addresses=["10.77.2.10"]), r"services\[0\].addresses\[0\].*is a workload's IP"),
    (lambda s: s.update(addresses=[]), r"services\[0\].addresses.*required"),
    (lambda s: s.update(ports=[{"port": 0}]), r"services\[0\].ports\[0\].port.*1-65535"),
    (lambda s: s.update(ports=[{"port": 80, "target": 8080}]), r"services\[0\].ports\[0\].*port and target_port"),
    (lambda s: s.update(ports=[{"port": 80}, {"port": 80}]), r"services\[0\].ports.*duplicate port"),
    (lambda s: s["endpoints"].append({"workload": "data/db-9"}), r"endpoints\[2\].workload.*names no workload"),
    (lambda s: s["endpoints"][0].update(ready="yes"), r"endpoints\[0\].ready.*true or false"),
    (lambda s: s.update(namespace="Data"), r"services\[0\].name"),
    (lambda s: s.update(selector={"app": "db"}), r"services\[0\].selector.*unknown field"),
])
def test_service_errors_name_the_field(mutate, words):
    doc = copy.deepcopy(DOC)
    mutate(doc["services"][0])
    with pytest.raises(ConfigError, match=words):
        parse_registry(doc, "td.example", source="workloads.yaml")


def test_two_services_cannot_share_an_address():
    doc = copy.deepcopy(DOC)
    doc["services"].append(dict(copy.deepcopy(DOC["services"][0]), name="db2"))
    with pytest.raises(ConfigError, match="duplicate address"):
        parse_registry(doc, "td.example")


def test_a_target_port_defaults_to_the_port():
    doc = copy.deepcopy(DOC)
    doc["services"][0]["ports"] = [{"port": 6379}]
    assert registry(doc).services[0].ports[0].target_port == 6379


def test_tcpmesh_flows_shows_the_service_before_the_chosen_endpoint():
    from agent.telemetry.cli import flow_row

    def format_line(record, now):
        return "  ".join(flow_row(record, now))

    route = route_outbound(registry(), "node1", "10.77.1.10", VIP, 5432, 15008, RoundRobin())
    flow = F.Flow(F.REPORTER_SOURCE, ConnectionFacts(route.destination.ip, route.target_port, b"ab"))
    flow.set_source(route.source)
    flow.set_destination(route.destination)
    flow.set_service(route.service)
    assert "svc/data/db→data/db-0:15432" in format_line(flow.record(), flow.start_time)
    plain = F.Flow(F.REPORTER_SOURCE, ConnectionFacts(route.destination.ip, 5432, b"cd"))
    plain.set_destination(route.destination)
    assert "svc/" not in format_line(plain.record(), plain.start_time)


def test_the_destination_takes_the_dialled_service_only_when_its_registry_agrees():
    """The OPEN's SERVICE TLV is attribution: the destination names the Service on its records only
    if its own registry has it with this workload as an endpoint; else "unknown"."""
    reg = registry()
    db0 = reg.by_ip("10.77.2.10")
    assert dialled_service(reg, "data/db", db0).host == "db.data.svc.cluster.local"
    web = reg.by_ip("10.77.1.10")
    assert dialled_service(reg, "data/db", web) is None          # not an endpoint of it: a lying client
    assert dialled_service(reg, "data/nope", db0) is None         # no such Service here
    assert dialled_service(reg, "", db0) is None                  # a workload address was dialled
    doc = copy.deepcopy(DOC)
    doc["services"][0]["endpoints"][0]["ready"] = False            # turning not ready as it opens
    assert dialled_service(registry(doc), "data/db", db0) is not None


def test_a_node_port_is_a_frontend_at_every_nodes_address_that_port_only():
    doc = copy.deepcopy(DOC)
    doc["services"][0]["ports"][0]["node_port"] = 30432
    reg = registry(doc)
    assert set(reg.node_port_frontends()) == {("10.76.0.1", 30432), ("10.76.0.2", 30432), ("10.76.0.3", 30432)}
    assert ("10.76.0.1", 30432) not in reg.service_frontends()  # the packet-level modes never get a node address
    route = route_outbound(reg, "node1", "10.77.1.10", "10.76.0.2", 30432, 15008, RoundRobin())
    assert route.kind is RouteKind.MESH and route.service.key == "data/db" and route.target_port == 15432
    assert reg.service_at("10.76.0.2", 22) is None
    entries = mesh_entries(service_destinations(reg.node_port_frontends()))
    assert lookup(entries, "10.76.0.2", 30432) == abi.DST_SERVICE and lookup(entries, "10.76.0.2", 10250) is None


def test_a_node_port_answers_at_every_address_of_a_node_and_its_agent_adds_its_local_ones():
    doc = copy.deepcopy(DOC)
    doc["services"][0]["ports"][0]["node_port"] = 30432
    doc["nodes"][1]["other_addresses"] = ["203.0.113.2", "fd00:76:0::2"]  # ExternalIP, a second InternalIP (IPv6)
    reg = registry(doc)
    assert {("203.0.113.2", 30432), ("fd00:76::2", 30432)} <= set(reg.node_port_frontends())
    route = route_outbound(reg, "node1", "10.77.1.10", "fd00:76::2", 30432, 15008, RoundRobin())
    assert route.kind is RouteKind.MESH and route.service.key == "data/db"
    # node1's agent: its pods' gateway (a local address) answers too; a Service's or a workload's address is not taken
    local = reg.with_node_addresses("node1", ["169.254.1.1", "10.76.0.1", VIP, "10.77.2.10"])
    assert local.nodes["node1"].addresses == ("10.76.0.1", "169.254.1.1")
    assert local.service_at("169.254.1.1", 30432)[0].key == "data/db" and local.service_at(VIP, 30432) is None
    assert reg.with_node_addresses("node1", ["10.76.0.1"]) is reg
    assert reg.with_node_addresses("node9", ["1.2.3.4"]) is reg


def test_a_host_port_is_a_frontend_of_its_pod_at_every_address_of_its_node_only():
    doc = copy.deepcopy(DOC)
    doc["nodes"][1]["other_addresses"] = ["fd00:76::2"]
    doc["workloads"][1]["host_ports"] = [{"port": 8443, "target_port": 5432}]  # data/db-0 on node2
    reg = registry(doc)
    assert {("10.76.0.2", 8443), ("fd00:76::2", 8443)} <= set(reg.node_port_frontends())
    assert ("10.76.0.1", 8443) not in reg.node_port_frontends()  # portmap answers on the pod's own node only
    route = route_outbound(reg, "node1", "10.77.1.10", "fd00:76::2", 8443, 15008, RoundRobin())
    assert route.kind is RouteKind.MESH and route.destination.name == "db-0" and route.target_port == 5432
    assert route.host_port and route.service is None
    assert route_outbound(reg, "node1", "10.77.1.10", "10.76.0.1", 8443, 15008).kind is RouteKind.REJECT


@pytest.mark.parametrize("host_ports", [{"port": 8443}, [{"port": 0}], [{"port": 8443, "protocol": "UDP"}]])
def test_a_bad_host_port_is_refused_naming_the_field(host_ports):
    doc = copy.deepcopy(DOC)
    doc["workloads"][1]["host_ports"] = host_ports
    with pytest.raises(ConfigError, match=r"workloads\[1\]\.host_ports"):
        registry(doc)


def test_a_nodes_other_address_that_is_no_ip_is_refused_naming_the_field():
    doc = copy.deepcopy(DOC)
    doc["nodes"][0]["other_addresses"] = ["10.76.0.9", "node1.example.com"]
    with pytest.raises(ConfigError, match=r"nodes\[0\]\.other_addresses\[1\]"):
        registry(doc)


def test_a_node_port_twice_is_refused_naming_the_field():
    doc = copy.deepcopy(DOC)
    doc["services"][0]["ports"][0]["node_port"] = 30432
    doc["services"].append({"name": "db2", "namespace": "data", "addresses": ["10.96.0.11"],
                            "ports": [{"port": 5432, "node_port": 30432}], "endpoints": ["data/db-0"]})
    with pytest.raises(ConfigError, match="node_port"):
        registry(doc)
