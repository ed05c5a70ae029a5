"""The node guard's host-network exemption with a real agent (issue #16 part 3; the bpf tier tests the
programs alone, tests/bpf/test_guard_host_network.py).

The DaemonSet puts the guard on kubepods, where hostNetwork pods live too (kube-proxy, the CNI's agents,
node exporters, the agent itself), and turns on ``capture.guard_exempt_host_network``
(docs/install-kubernetes.md, "The node guard on kubepods"). Here the lab's agent runs with that setting
and its guard on the node's pods cgroup. A host-network process — the node's network namespace, a
cgroup below the guard that no workload owns — must connect; a pod the agent has not attached (its own
network namespace, a cgroup below the guard that is no registry workload, as a pod that started before
the agent attached it) must still be refused at connect() with EPERM, whatever the exemption says: the
exemption is "the agent's own network namespace", not "anything the agent does not know".
Needs SO_NETNS_COOKIE (Linux 5.14; before, the agent refuses the setting, tests/bpf covers that).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml

from agent.lab import lab as labops
from tests.bpf.conftest import kernel_version
from tests.hostile.conftest import plaintext_connect, running_lab

PORT = 7431

pytestmark = pytest.mark.skipif(kernel_version(os.uname().release) < (5, 14),
                                reason="capture.guard_exempt_host_network needs SO_NETNS_COOKIE (Linux 5.14)")


@pytest.fixture(scope="module")
def guarded_lab(bpf_capable):
    with running_lab("gh", "gh.tcpmesh", nodes=1, pods_per_node=2) as lab:
        node = lab.node(1)
        config = yaml.safe_load(Path(node.config_file).read_text())
        config["capture"]["guard_exempt_host_network"] = True  # as deploy/kubernetes/02-config.yaml
        Path(node.config_file).write_text(yaml.safe_dump(config, sort_keys=False))
        labops.lab_restart_agent(lab.name, node.name)
        lab.start_server("n1p2", PORT, "echo")
        yield lab


@pytest.fixture
def unowned_cgroup(guarded_lab):
    """A fresh cgroup below the node's guard that no workload owns; removed afterwards."""
    path = Path(guarded_lab.node(1).pods_cgroup) / f"unowned-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield str(path)
    finally:
        path.rmdir()


def test_the_agent_runs_with_its_guard_on_the_pods_cgroup(guarded_lab):
    node = guarded_lab.node(1)
    assert f"guard on {node.pods_cgroup}" in Path(node.log_file).read_text()


def test_a_host_network_process_below_the_guard_connects(guarded_lab, unowned_cgroup):
    """kube-proxy, a node exporter, the agent in the DaemonSet: the node's network namespace."""
    server = guarded_lab.pod("n1p2")
    outcome = plaintext_connect(guarded_lab.node(1).netns, (server.ip, PORT), unowned_cgroup, timeout=3.0)
    assert outcome == "connected", f"the guard refused a host-network process: {outcome}"


def test_a_pod_the_agent_has_not_attached_is_still_refused(guarded_lab, unowned_cgroup):
    """A pod's own network namespace, a cgroup below the guard the agent never attached: EPERM at connect()."""
    server = guarded_lab.pod("n1p2")
    pod_netns = guarded_lab.pod("n1p1").netns  # a pod's own namespace: not the agent's
    outcome = plaintext_connect(pod_netns, (server.ip, PORT), unowned_cgroup, timeout=3.0)
    assert outcome == "PermissionError", f"an uncaptured pod got past the guard: {outcome}"
