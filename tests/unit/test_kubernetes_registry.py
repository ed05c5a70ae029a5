"""The pure half of the Kubernetes source: which pods become workloads, which node address they get,
where a pod's cgroup is in both kubelet layouts, and the backoff schedule."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from agent.registry.kubernetes.cgroups import find_pod_cgroup, own_pod_cgroup, pod_cgroup_candidates
from agent.registry.kubernetes.mapping import build_registry, node_internal_ip, node_other_addresses, pod_host_ports
from agent.registry.kubernetes.watch import Backoff

OBJECTS = json.loads((Path(__file__).parents[1] / "integration" / "test_kubernetes_objects.json").read_text())
UID = "5f0c6b1e-2a3d-4c5e-8f70-1a2b3c4d5e6f"


def build(pods=None, nodes=None, cgroup_of=lambda pod: None, node="worker-1"):
    return build_registry("cluster.local", node, OBJECTS["pods"] if pods is None else pods,
                          OBJECTS["nodes"] if nodes is None else nodes, cgroup_of)


def pod(name: str) -> dict:
    return copy.deepcopy(next(p for p in OBJECTS["pods"] if p["metadata"]["name"] == name))


def test_node_address_is_the_first_ipv4_internal_ip():
    node = copy.deepcopy(OBJECTS["nodes"][0])
    assert node_internal_ip(node) == "10.0.0.11"
    node["status"]["addresses"] = [{"type": "InternalIP", "address": "fd00::11"}, {"type": "ExternalIP", "address": "1.2.3.4"},
                                   {"type": "InternalIP", "address": "10.9.9.9"}]
    assert node_internal_ip(node) == "10.9.9.9"
    node["status"]["addresses"] = [{"type": "ExternalIP", "address": "1.2.3.4"}]
    assert node_internal_ip(node) is None


def test_every_internal_and_external_ip_of_a_node_answers_its_node_ports():
    node = copy.deepcopy(OBJECTS["nodes"][0])
    node["status"]["addresses"] = [
        {"type": "InternalIP", "address": "10.9.9.9"}, {"type": "InternalIP", "address": "fd00:0::11"},
        {"type": "ExternalIP", "address": "203.0.113.9"}, {"type": "InternalIP", "address": "10.9.9.10"},
        {"type": "Hostname", "address": "worker-1"}, {"type": "ExternalDNS", "address": "w1.example.com"}]
    assert node_other_addresses(node, "10.9.9.9") == ("fd00::11", "203.0.113.9", "10.9.9.10")
    built = build(nodes=[node])
    assert built.registry.nodes["worker-1"].addresses == ("10.9.9.9", "fd00::11", "203.0.113.9", "10.9.9.10")


def test_a_pods_tcp_host_ports_are_read_from_its_containers():
    spec = {"containers": [{"ports": [{"containerPort": 443, "hostPort": 8443}, {"containerPort": 80},
                                      {"containerPort": 53, "hostPort": 53, "protocol": "UDP"}]},
                           {"ports": [{"containerPort": 9000, "hostPort": 9000, "protocol": "TCP"}]}]}
    assert [(p.port, p.target_port) for p in pod_host_ports(spec)] == [(8443, 443), (9000, 9000)]
    assert pod_host_ports({}) == ()


def test_pods_become_workloads_with_identity_from_namespace_and_service_account():
    result = build(cgroup_of=lambda p: f"/cg/{p['metadata']['uid']}")
    by_key = {w.key: w for w in result.registry.workloads}
    assert set(by_key) == {"shop/web-7d4b9c6f5-x2x9k", "shop/cart-5c8d7b9f4-qq7lm", "data/postgres-0"}
    assert by_key["data/postgres-0"].spiffe_id.uri == "spiffe://cluster.local/ns/data/sa/postgres"
    assert by_key["shop/web-7d4b9c6f5-x2x9k"].cgroup == f"/cg/{UID}"       # local: cgroup looked up
    assert by_key["data/postgres-0"].cgroup is None                        # remote: never looked up
    assert {k for k, _ in result.skipped} == {"kube-system/kube-proxy-7xk2p", "shop/migrate-28881000-abcde",
                                              "shop/web-7d4b9c6f5-pend1"}


def test_a_pod_without_service_account_name_is_default():
    p = pod("postgres-0")
    del p["spec"]["serviceAccountName"]
    (w,) = build(pods=[p]).registry.workloads
    assert w.service_account == "default"


@pytest.mark.parametrize("change, reason", [
    (lambda p: p["spec"].update(hostNetwork=True), "hostNetwork"),
    (lambda p: p["status"].update(phase="Failed"), "phase Failed"),
    (lambda p: p["status"].update(podIP="fd00::7", podIPs=[{"ip": "fd00::7"}]), "IPv6-only pod"),
    (lambda p: p["spec"].pop("nodeName"), "not scheduled"),
    (lambda p: p["spec"].update(nodeName="worker-9"), "unknown or has no InternalIP"),
    (lambda p: p["spec"].update(serviceAccountName="Bad_SA"), "service account"),
])
def test_pods_that_cannot_be_mesh_workloads_are_left_out_with_a_reason(change, reason):
    p = pod("postgres-0")
    change(p)
    result = build(pods=[p])
    assert result.registry.workloads == ()
    assert reason in result.skipped[0][1]


def test_a_pod_of_an_ipv6_primary_dual_stack_cluster_is_meshed_by_its_ipv4_entry_of_pod_ips():
    """podIP is the primary family's address: IPv6 on a cluster configured IPv6 first. The pod has an IPv4
    address all the same (status.podIPs); leaving it out left it, and its Services, outside the mesh."""
    p = pod("postgres-0")
    ip4 = p["status"]["podIP"]
    p["status"].update(podIP="fd00::7", podIPs=[{"ip": "fd00::7"}, {"ip": ip4}])
    (w,) = build(pods=[p]).registry.workloads
    assert (w.ip, w.ip6) == (ip4, "fd00::7")


def test_two_pods_with_one_ip_keep_the_newer_one():
    old, new = pod("postgres-0"), pod("postgres-0")
    new["metadata"].update(name="postgres-1", uid="x", creationTimestamp="2026-11-22T00:00:00Z")
    result = build(pods=[new, old])
    assert [w.name for w in result.registry.workloads] == ["postgres-1"]
    assert "newer pod data/postgres-1" in dict(result.skipped)["data/postgres-0"]


def test_local_pods_without_a_cgroup_are_reported_missing():
    result = build(cgroup_of=lambda p: None)
    assert set(result.missing_cgroups) == {"shop/web-7d4b9c6f5-x2x9k", "shop/cart-5c8d7b9f4-qq7lm"}


def test_cgroup_candidates_cover_both_kubelet_drivers_and_put_the_pods_qos_first():
    uid = "1a2b-3c"
    assert pod_cgroup_candidates(uid, "Burstable")[:2] == [
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c.slice", "kubepods/burstable/pod1a2b-3c"]
    assert pod_cgroup_candidates(uid, "Guaranteed")[:2] == ["kubepods.slice/kubepods-pod1a2b_3c.slice",
                                                            "kubepods/pod1a2b-3c"]
    assert len(pod_cgroup_candidates(uid, "")) == 6


@pytest.mark.parametrize("layout", [
    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice",   # systemd driver
    "kubepods.slice/kubepods-pod{u}.slice",                                          # systemd, Guaranteed
    "kubepods/besteffort/pod{uid}",                                                  # cgroupfs driver
    "kubepods/pod{uid}",                                                             # cgroupfs, Guaranteed
    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice",
])
def test_find_pod_cgroup_in_every_layout(tmp_path, layout):
    path = tmp_path / layout.format(uid=UID, u=UID.replace("-", "_"))
    path.mkdir(parents=True)
    (tmp_path / "kubepods.slice").mkdir(exist_ok=True)      # other pods' noise
    assert find_pod_cgroup(str(tmp_path), UID, "BestEffort") == str(path)
    assert find_pod_cgroup(str(tmp_path), "00000000-0000-4000-8000-000000000000", "BestEffort") is None
    assert find_pod_cgroup(str(tmp_path), "", "BestEffort") is None


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    backoff = Backoff(initial=0.5, maximum=4, jitter=0.2, rng=random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4]):
        assert base * 0.8 <= delay <= base * 1.2
    backoff.reset()
    assert 0.4 <= backoff.next() <= 0.6


@pytest.mark.parametrize("layout, kubepods", [
    ("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice", "kubepods.slice"),
    ("kubepods/burstable/pod{uid}", "kubepods"),
    ("kubelet.slice/kubepods.slice/kubepods-pod{u}.slice", "kubelet.slice/kubepods.slice")])
def test_the_daemonsets_start_line_finds_its_pod_cgroup_and_the_kubepods_cgroup_above_it(tmp_path, capsys, layout,
                                                                                        kubepods):
    uid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    pod = tmp_path / layout.format(uid=uid, u=uid.replace("-", "_"))
    pod.mkdir(parents=True)
    assert own_pod_cgroup(["pod-cgroup", str(tmp_path), uid]) == 0
    assert capsys.readouterr().out.strip() == str(pod)
    assert own_pod_cgroup(["kubepods-cgroup", str(tmp_path), uid]) == 0   # TCPMESH_CAPTURE_PODS_CGROUP
    assert capsys.readouterr().out.strip() == str(tmp_path / kubepods)
    assert own_pod_cgroup(["kubepods-cgroup", str(tmp_path), "no-such-pod"]) == 1
    assert "no cgroup of pod no-such-pod" in capsys.readouterr().err
