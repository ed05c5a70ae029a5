"""Registry file parsing (errors name file, entry and field) and the pure routing decisions."""

import pytest

from agent.errors import ConfigError
from agent.connection import flow as F
from agent.proxy.routing import RouteKind, route_inbound, route_outbound
from agent.registry.static_file import load_registry_file, parse_registry

DOC = {
    "nodes": [{"name": "node1", "address": "10.76.0.1"}, {"name": "node2", "address": "10.76.0.2"}],
    "workloads": [
        {"name": "web", "namespace": "shop", "service_account": "web", "ip": "10.77.1.10", "node": "node1",
         "cgroup": "/sys/fs/cgroup/unified/x/web"},
        {"name": "db", "namespace": "data", "service_account": "postgres", "ip": "10.77.2.10", "node": "node2"},
    ],
}


def registry():
    return parse_registry(DOC, "td.example")


def test_registry_lookups():
    reg = registry()
    assert reg.by_ip("10.77.2.10").spiffe_id.uri == "spiffe://td.example/ns/data/sa/postgres"
    assert [w.name for w in reg.local("node1")] == ["web"]
    assert reg.node_of(reg.by_ip("10.77.2.10")).address == "10.76.0.2"


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["workloads"][0].update(ip="10.77.1"), r"workloads\[0\].ip"),
    (lambda d: d["workloads"][1].update(node="node7"), r"workloads\[1\].node.*names no node"),
    (lambda d: d["workloads"][1].update(ip="10.77.1.10"), "duplicate ip"),
    # which two entries clash, not only the address (seen failing: "workloads: duplicate ip/ip6")
    (lambda d: d["workloads"][1].update(ip="10.77.1.10"), r"workloads\[1\].ip: .*also workloads\[0\] \(shop/web\)"),
    (lambda d: d["workloads"][1].update(name="web", namespace="shop"), r"workloads\[1\]: .*also workloads\[0\]"),
    # a misspelt node field was silently ignored (seen failing: no error at all)
    (lambda d: d["nodes"][1].update(adress="10.76.0.9"), r"nodes\[1\].adress.*unknown field.*name, address"),
    (lambda d: d["workloads"][0].update(namespace="Shop"), r"workloads\[0\].namespace"),
    (lambda d: d["workloads"][0].update(cgroup="relative/path"), r"workloads\[0\].cgroup"),
    (lambda d: d["workloads"][0].update(colour="blue"), r"workloads\[0\].colour.*unknown field"),
    (lambda d: d["nodes"][0].pop("address"), r"nodes\[0\].address.*required"),
    (lambda d: d.update(extra=1), "unknown top-level key"),
])
def test_registry_errors_name_the_entry_and_field(mutate, words):
    import copy

    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(ConfigError, match=words):
        parse_registry(doc, "td.example")


def test_registry_file_errors_name_the_file(tmp_path):
    path = tmp_path / "workloads.yaml"
    path.write_text("workloads: [{name: a}]\nnodes: []\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_registry_file(path, "td.example")


def test_outbound_routes_mesh_destination_to_its_node():
    route = route_outbound(registry(), "node1", "10.77.1.10", "10.77.2.10", 5432, 15008)
    assert route.kind is RouteKind.MESH
    assert route.tunnel_address == ("10.76.0.2", 15008)
    assert route.destination.name == "db"


def test_outbound_never_dials_destinations_outside_the_mesh():
    route = route_outbound(registry(), "node1", "10.77.1.10", "192.0.2.1", 443, 15008)
    assert route.kind is RouteKind.REJECT and route.flag == F.FLAG_NO_ROUTE
    assert "192.0.2.1:443 is not in the mesh" in route.reason


def test_outbound_refuses_clients_it_cannot_identify():
    route = route_outbound(registry(), "node1", "10.77.9.9", "10.77.2.10", 5432, 15008)
    assert route.kind is RouteKind.REJECT and route.flag == F.FLAG_NO_IDENTITY
    # a pod of another node cannot use this node's identities either
    assert route_outbound(registry(), "node2", "10.77.1.10", "10.77.2.10", 5432, 15008).kind is RouteKind.REJECT


def test_inbound_accepts_only_local_workloads_under_the_requested_identity():
    reg = registry()
    db = reg.by_ip("10.77.2.10").spiffe_id
    assert route_inbound(reg, "node2", "10.77.2.10", db).workload.name == "db"
    assert route_inbound(reg, "node1", "10.77.2.10", db).workload is None
    wrong = route_inbound(reg, "node2", "10.77.2.10", reg.by_ip("10.77.1.10").spiffe_id)
    assert wrong.workload is None and "asked for spiffe://td.example/ns/shop/sa/web" in wrong.reason
    assert route_inbound(reg, "node2", "10.77.2.10", None).workload is None


def test_registry_file_yaml_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "workloads.yaml"
    path.write_text("nodes:\n  - {name: node1, address: 10.76.0.1}\nworkloads:\n  - {name: a, ip: [}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: not valid YAML"):
        load_registry_file(path, "td.example")
