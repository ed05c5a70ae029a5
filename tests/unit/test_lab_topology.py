"""The lab plan is pure: names, addresses, cgroups and files follow docs/lab.md, and are unique."""

import ipaddress

import pytest

from agent.errors import ConfigError
from agent.lab.topology import (IFNAME_MAX, MAX_NODES, MAX_PODS_PER_NODE, interface_names, is_lab_netns,
                                plan_lab)


def test_two_by_two_addresses_and_names():
    plan = plan_lab("demo", 2, 2, "lab.tcpmesh", cgroup_root="/sys/fs/cgroup/unified", state_root="/run/tcpmesh-lab")
    assert plan.wire_netns == "tcpmesh-demo-wire"
    assert [n.name for n in plan.nodes] == ["node1", "node2"]
    node2 = plan.node("node2")
    assert node2.netns == "tcpmesh-demo-node2"
    assert node2.wire_address == "10.76.0.2" and node2.admin_address == "10.76.0.2:15020"
    assert node2.routes == (("10.77.1.0/24", "10.76.0.1"),)
    assert node2.agent_cgroup == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node2/agent"
    assert node2.pods_cgroup == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node2/pods"
    assert node2.bpffs_dir == "/sys/fs/bpf/tcpmesh-lab-demo/node2" and plan.bpffs_dir == "/sys/fs/bpf/tcpmesh-lab-demo"
    assert node2.config_file == "/run/tcpmesh-lab/demo/nodes/node2/config.yaml"
    pod = plan.pod("n2p1")
    assert (pod.ip, pod.node, pod.netns) == ("10.77.2.11", "node2", "tcpmesh-demo-n2p1")
    assert (pod.ifname, pod.node_ifname) == ("eth0", "tmn2p1")
    assert pod.cgroup == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node2/pods/n2p1"
    assert pod.containers == (f"{pod.cgroup}/pause", f"{pod.cgroup}/app") and pod.exec_cgroup == f"{pod.cgroup}/app"
    assert pod.spiffe_id == "spiffe://lab.tcpmesh/ns/lab/sa/n2p1"
    assert plan.netns_names[-1] == plan.wire_netns


def test_pod_ips_sit_in_their_node_cidr_and_agent_cgroup_is_outside_pods():
    plan = plan_lab("x", 5, 7)
    for node in plan.nodes:
        cidr = ipaddress.ip_network(node.pod_cidr)
        for pod in node.pods:
            assert ipaddress.ip_address(pod.ip) in cidr
            assert not node.agent_cgroup.startswith(pod.cgroup + "/")
            assert not pod.cgroup.startswith(node.agent_cgroup + "/")
            assert pod.cgroup.startswith(node.pods_cgroup + "/")  # the node guard covers every pod
        assert not node.agent_cgroup.startswith(node.pods_cgroup + "/")  # ... but never the agent
        assert {cidr for cidr, _ in node.routes} == {n.pod_cidr for n in plan.nodes if n is not node}


@pytest.mark.parametrize("nodes, pods", [(1, 0), (3, 4), (MAX_NODES, 1), (2, MAX_PODS_PER_NODE)])
def test_everything_unique_and_interface_names_fit(nodes, pods):
    plan = plan_lab("a-long-lab-name-here", nodes, pods)
    assert all(len(name) <= IFNAME_MAX for name in interface_names(plan))
    for values in ([p.ip for p in plan.pods], [p.netns for p in plan.pods] + [n.netns for n in plan.nodes],
                   [p.node_ifname for p in plan.pods], [n.bridge_port for n in plan.nodes],
                   [n.wire_address for n in plan.nodes], [p.cgroup for p in plan.pods],
                   [p.spiffe_id for p in plan.pods]):
        assert len(values) == len(set(values))
    assert len(plan.netns_names) == len(set(plan.netns_names)) == 1 + nodes + nodes * pods
    assert all(is_lab_netns(plan.name, ns) for ns in plan.netns_names)


def test_flat_pods_run_their_processes_in_the_pod_cgroup():
    pod = plan_lab("demo", 1, 1, flat_pods=True).pod("n1p1")
    assert pod.containers == () and pod.exec_cgroup == pod.cgroup


def test_service_account_override_and_namespace():
    plan = plan_lab("demo", 2, 1, "example.org", namespace="shop", service_accounts={"n1p1": "client"})
    assert plan.pod("n1p1").spiffe_id == "spiffe://example.org/ns/shop/sa/client"
    assert plan.pod("n2p1").service_account == "n2p1"


def test_lab_netns_recognition_does_not_cross_labs():
    assert is_lab_netns("a", "tcpmesh-a-node1")
    assert is_lab_netns("a", "tcpmesh-a-n1p2")
    assert not is_lab_netns("a", "tcpmesh-a-b-node1")      # belongs to lab "a-b"
    assert is_lab_netns("a-b", "tcpmesh-a-b-node1")
    assert not is_lab_netns("a", "tcpmesh-a-node1-extra")
    assert not is_lab_netns("a", "tcpmesh-test-123")


def test_the_issuer_namespace_is_the_lab_s_so_lab_down_removes_it():
    """`lab up --identity issuer` makes tcpmesh-<lab>-issuer; lab_down removes what is_lab_netns claims
    (it left every issuer namespace behind before)."""
    from agent.lab.issuer import netns as issuer_netns
    from agent.lab.topology import plan_lab

    assert is_lab_netns("iss1", issuer_netns(plan_lab("iss1", 2, 1)))
    assert not is_lab_netns("iss", "tcpmesh-iss-issuer2")


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "Bad"}, "--name"), ({"name": "x" * 21}, "--name"), ({"name": "ends-"}, "--name"),
    ({"nodes": 0}, "--nodes"), ({"nodes": MAX_NODES + 1}, "--nodes"),
    ({"pods_per_node": MAX_PODS_PER_NODE + 1}, "--pods-per-node"),
    ({"trust_domain": "Not Valid"}, "--trust-domain"),
    ({"service_accounts": {"n9p9": "x"}}, "--service-account"),
    ({"service_accounts": {"n1p1": "UPPER"}}, "--service-account"),
])
def test_bad_input_names_the_option(kwargs, field):
    args = {"name": "demo", "nodes": 2, "pods_per_node": 2, **kwargs}
    with pytest.raises(ConfigError) as err:
        plan_lab(args.pop("name"), args.pop("nodes"), args.pop("pods_per_node"), **args)
    assert err.value.field == field
