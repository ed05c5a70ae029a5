"""The files a lab writes load with the agent's own config and registry parsers."""

from agent.config import config_from_mapping, validate
from agent.lab.files import agent_config, plan_from_state, registry_document, state_document
from agent.lab.topology import plan_lab
from agent.registry.static_file import parse_registry


def _plan():
    return plan_lab("demo", 2, 2, "lab.tcpmesh", service_accounts={"n1p2": "client"},
                    cgroup_root="/sys/fs/cgroup/unified", state_root="/run/tcpmesh-lab")


def test_agent_config_is_a_valid_agent_config():
    plan = _plan()
    config = validate(config_from_mapping(agent_config(plan, plan.node("node2"))))
    assert config.node.name == "node2" and config.node.address == "10.76.0.2"
    assert config.admin.address == "10.76.0.2" and config.admin.port == 15020
    assert config.capture.redirect_address == "169.254.1.1"
    assert config.capture.cgroup_root == "/sys/fs/cgroup/unified"
    assert config.capture.pods_cgroup == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node2/pods"
    assert config.capture.cgroup_scope == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node2"
    assert config.capture.bpffs_dir == "/sys/fs/bpf/tcpmesh-lab-demo/node2"
    assert config.identity.node_ca_dir == "/run/tcpmesh-lab/demo/nodes/node2/node-ca" and config.identity.ca_dir == ""
    assert config.registry.file == "/run/tcpmesh-lab/demo/workloads.yaml"
    assert config.state_dir == "/run/tcpmesh-lab/demo/nodes/node2"


def test_registry_lists_every_node_and_pod():
    plan = _plan()
    registry = parse_registry(registry_document(plan), "cluster.local")
    assert registry.trust_domain == "lab.tcpmesh"
    assert {n.name: n.address for n in registry.nodes.values()} == {"node1": "10.76.0.1", "node2": "10.76.0.2"}
    workload = registry.by_ip("10.77.1.12")
    assert (workload.name, workload.node, workload.service_account) == ("n1p2", "node1", "client")
    assert workload.cgroup == "/sys/fs/cgroup/unified/tcpmesh-lab-demo/node1/pods/n1p2"
    assert str(workload.spiffe_id) == plan.pod("n1p2").spiffe_id
    assert len(registry.local("node2")) == 2


def test_state_round_trips_to_the_same_plan():
    plan = _plan()
    doc = state_document(plan, nodes=2, pods_per_node=2, service_accounts={"n1p2": "client"},
                         state_root="/run/tcpmesh-lab", agents_requested=False, capture_mode="none",
                         ca_dir=None, phase="up", agents={}, created="2026-01-01T00:00:00+00:00")
    assert doc["version"] == 1
    assert plan_from_state(doc, "state.json") == plan
    flat = plan_lab("demo", 2, 2, cgroup_root="/sys/fs/cgroup/unified", flat_pods=True)
    doc = state_document(flat, nodes=2, pods_per_node=2, service_accounts={}, state_root="/run/tcpmesh-lab",
                         agents_requested=False, capture_mode="none", ca_dir=None, phase="up", agents={},
                         created="2026-01-01T00:00:00+00:00", flat_pods=True)
    assert plan_from_state(doc, "state.json") == flat and flat.pod("n1p1").containers == ()
