"""Services and EndpointSlices of the Kubernetes source → the registry's Services (pure mapping):
ClusterIPs (IPv4 and IPv6), TCP ports with numeric and named target ports, which endpoints take new
connections (the API's ready / serving / terminating conditions), and what is left to kube-proxy."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from agent.registry.kubernetes.mapping import build_registry
from agent.registry.model import Endpoint, ServicePort

OBJECTS = json.loads((Path(__file__).parents[1] / "integration" / "test_kubernetes_objects.json").read_text())
WEB, PG = "shop/web-7d4b9c6f5-x2x9k", "data/postgres-0"


def obj(kind: str, name: str) -> dict:
    return copy.deepcopy(next(o for o in OBJECTS[kind] if o["metadata"]["name"] == name))


def build(services=None, slices=None, pods=None):
    return build_registry("cluster.local", "worker-1", OBJECTS["pods"] if pods is None else pods, OBJECTS["nodes"],
                          lambda pod: None, OBJECTS["services"] if services is None else services,
                          OBJECTS["endpointslices"] if slices is None else slices)


def ready_of(service) -> dict[str, bool]:
    return {e.workload: e.ready for e in service.endpoints}


def service(result, key: str):
    return next((s for s in result.registry.services if s.key == key), None)


def endpoint(address: str, pod: str | None, **conditions) -> dict:
    e = {"addresses": [address], "conditions": conditions, "nodeName": "worker-1"}
    if pod:
        e["targetRef"] = {"kind": "Pod", "namespace": "shop", "name": pod, "uid": "x"}
    return e


def web_slice(*endpoints, port: int = 8080, name: str = "web-8xk2d", address_type: str = "IPv4") -> dict:
    s = obj("endpointslices", "web-8xk2d")
    s["metadata"].update(name=name, uid=f"uid-{name}")
    s["addressType"] = address_type
    s["ports"][0]["port"] = port
    s["endpoints"] = list(endpoints)
    return s


def second_web_pod(name: str = "web-7d4b9c6f5-b2b2b", ip: str = "10.244.1.6", ip6: str | None = None) -> dict:
    pod = obj("pods", "web-7d4b9c6f5-x2x9k")
    pod["metadata"].update(name=name, uid=f"uid-{name}")
    pod["status"].update(podIP=ip, podIPs=[{"ip": ip}] + ([{"ip": ip6}] if ip6 else []))
    return pod


def test_cluster_ips_of_both_families_and_tcp_ports_with_named_target_ports():
    result = build()
    assert [s.key for s in result.registry.services] == ["data/postgres", "shop/web"]
    web = service(result, "shop/web")
    assert web.addresses == ("10.96.12.30", "fd00:10:96::1e")          # IPv4 and IPv6 ClusterIPs, canonical
    assert web.ports == (ServicePort(80, 8080),)                        # targetPort "http" → the slice's number; UDP out
    assert web.endpoints == (Endpoint(WEB, True),)
    assert service(result, "data/postgres").ports == (ServicePort(5432, 5432),)   # the unnamed port ("")
    assert result.registry.service_at("fd00:10:96::1e", 80)[1:] == (8080, (result.registry.by_ip("10.244.1.5"),))
    assert result.registry.service_at("10.96.12.30", 9125) is None, "a UDP port is not captured"


def test_services_outside_the_mesh_are_left_to_kube_proxy_with_a_reason():
    result = build()
    skipped = dict(result.services_skipped)
    assert "not captured" in skipped["default/kubernetes"]                 # the API server: hostNetwork, no pod
    assert "headless" in skipped["data/postgres-headless"]
    assert result.registry.service_at("10.96.0.1", 443) is None
    external = obj("services", "web")
    external["metadata"].update(name="mail", uid="u-mail")
    external["spec"] = {"type": "ExternalName", "externalName": "mail.example.com"}
    assert "ExternalName" in dict(build(services=[external]).services_skipped)["shop/mail"]


def test_a_service_without_endpoint_slices_is_not_captured_until_it_has_mesh_endpoints():
    result = build(slices=[])
    assert result.registry.services == ()
    assert "no EndpointSlice" in dict(result.services_skipped)["shop/web"]


def test_only_ready_endpoints_take_new_connections_and_nil_ready_means_ready():
    pods = OBJECTS["pods"] + [second_web_pod()]
    result = build(pods=pods, slices=[web_slice(endpoint("10.244.1.5", "web-7d4b9c6f5-x2x9k"),   # conditions {}: ready
                                                endpoint("10.244.1.6", "web-7d4b9c6f5-b2b2b", ready=False,
                                                         serving=False))])
    web = service(result, "shop/web")
    assert ready_of(web) == {WEB: True, "shop/web-7d4b9c6f5-b2b2b": False}
    assert [w.key for w in result.registry.service_at("10.96.12.30", 80)[2]] == [WEB]


def test_terminating_endpoints_are_not_ready_but_serve_when_no_endpoint_is_ready():
    pods = OBJECTS["pods"] + [second_web_pod()]
    going = endpoint("10.244.1.5", "web-7d4b9c6f5-x2x9k", ready=False, serving=True, terminating=True)
    new = endpoint("10.244.1.6", "web-7d4b9c6f5-b2b2b", ready=True, serving=True, terminating=False)
    web = service(build(pods=pods, slices=[web_slice(going, new)]), "shop/web")
    assert ready_of(web) == {WEB: False, "shop/web-7d4b9c6f5-b2b2b": True}
    # every endpoint shutting down: the still-serving ones take new connections (kube-proxy's fallback)
    stopped = endpoint("10.244.1.6", "web-7d4b9c6f5-b2b2b", ready=False, serving=False, terminating=True)
    web = service(build(pods=pods, slices=[web_slice(going, stopped)]), "shop/web")
    assert ready_of(web) == {WEB: True, "shop/web-7d4b9c6f5-b2b2b": False}


def test_endpoints_match_workloads_by_target_ref_or_address_and_dual_stack_slices_merge():
    pods = OBJECTS["pods"] + [second_web_pod(ip6="fd00:244:1::6")]
    v4 = web_slice(endpoint("10.244.1.5", None))                                    # no targetRef: by address
    v6 = web_slice(endpoint("fd00:244:1:0::6", "web-7d4b9c6f5-b2b2b", ready=False), name="web-v6", address_type="IPv6")
    v4b = web_slice(endpoint("10.244.1.6", "web-7d4b9c6f5-b2b2b", ready=True), name="web-v4b")
    web = service(build(pods=pods, slices=[v4, v6, v4b]), "shop/web")
    assert ready_of(web) == {WEB: True, "shop/web-7d4b9c6f5-b2b2b": True}
    fqdn = web_slice(endpoint("web.example.com", None), name="web-fqdn", address_type="FQDN")
    assert service(build(slices=[fqdn]), "shop/web") is None


def test_endpoints_outside_the_mesh_are_left_out_and_said_so():
    outsider = endpoint("192.168.7.7", None)
    result = build(slices=[web_slice(endpoint("10.244.1.5", "web-7d4b9c6f5-x2x9k"), outsider)])
    assert service(result, "shop/web").endpoints == (Endpoint(WEB, True),)
    assert any("192.168.7.7" in why for key, why in result.services_skipped if key == "shop/web")


def test_a_renumbered_named_port_keeps_one_target_port_and_takes_the_odd_endpoint_out_of_rotation():
    pods = OBJECTS["pods"] + [second_web_pod(), second_web_pod("web-7d4b9c6f5-c3c3c", "10.244.1.7")]
    old = web_slice(endpoint("10.244.1.5", "web-7d4b9c6f5-x2x9k"), endpoint("10.244.1.6", "web-7d4b9c6f5-b2b2b"))
    new = web_slice(endpoint("10.244.1.7", "web-7d4b9c6f5-c3c3c"), port=9090, name="web-new")
    result = build(pods=pods, slices=[old, new])
    web = service(result, "shop/web")
    assert web.ports == (ServicePort(80, 8080),)
    assert ready_of(web)["shop/web-7d4b9c6f5-c3c3c"] is False
    assert any("9090" in why for key, why in result.services_skipped if key == "shop/web")


def test_a_numeric_target_port_is_used_when_no_slice_names_the_port():
    pg = obj("services", "postgres")
    pg["spec"]["ports"] = [{"name": "sql", "protocol": "TCP", "port": 5432, "targetPort": 6432},
                           {"name": "admin", "protocol": "TCP", "port": 8008}]
    slice_ = obj("endpointslices", "postgres-q7v4n")
    slice_["ports"] = [{"name": "sql", "protocol": "TCP", "port": 6432}]
    assert service(build(services=[pg], slices=[slice_]), "data/postgres").ports == (
        ServicePort(5432, 6432), ServicePort(8008, 8008))   # targetPort defaults to port


def test_a_node_port_service_carries_its_node_ports():
    from agent.registry.kubernetes.services import build_services
    from agent.registry.model import Workload

    pod = Workload("db-0", "shop", "db", "10.244.1.5", "n1", None, "td")
    service = {"metadata": {"name": "db", "namespace": "shop"},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                        "ports": [{"name": "pg", "port": 5432, "targetPort": 5432, "nodePort": 30432}]}}
    eps = {"metadata": {"name": "db-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
           "addressType": "IPv4", "ports": [{"name": "pg", "port": 5432}],
           "endpoints": [{"addresses": ["10.244.1.5"], "targetRef": {"kind": "Pod", "name": "db-0"}}]}
    (built,), _ = build_services([service], [eps], [pod])
    assert [(p.port, p.target_port) for p in built.node_ports] == [(30432, 5432)]
