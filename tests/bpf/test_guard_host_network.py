"""The node guard on a kubelet-shaped kubepods tree, with the agent itself below kubepods (the
DaemonSet): ``capture.guard_exempt_host_network`` lets TCP connects from sockets of the agent's own
network namespace (hostNetwork pods: the agent, kube-proxy, the CNI) through, while a pod in its own
netns that is not captured (yet) is still refused with EPERM.

Layout (per test, real cgroups under the per-test cgroup, real namespaces)::

    <test cgroup>/kubepods.slice                                   the guard
      kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope
                                                                   a pod, pod netns, not captured
      kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
                                                                   the agent, node netns (hostNetwork)
"""

from __future__ import annotations

import errno
import socket
import uuid

import pytest

from agent.capture.connect_mode import SO_NETNS_COOKIE, own_netns_cookie
from agent.errors import EnvironmentProblem
from tests.bpf.conftest import kernel_version
from tests.bpf.bpfworld import NODE_IP, POD_IP, REDIRECT_PORT, mesh_capture, socket_in
from tests.bpf.test_connect_capture import REMOTE, delta

POD_PORT = 5432


def netns_cookie(netns_file: str) -> int:
    with socket_in(netns_file, None) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@pytest.fixture
def kubepods(test_cgroup):
    """The kubelet's tree (systemd driver) with a pod container and the agent's container."""
    root = test_cgroup / "kubepods.slice"
    pod_uid, agent_uid = (uuid.uuid4().hex for _ in range(2))
    pod = root / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{pod_uid}.slice"
    agent = root / "kubepods-burstable.slice" / f"kubepods-burstable-pod{agent_uid}.slice"
    dirs = {"kubepods": root, "pod": pod, "pod_container": pod / f"cri-containerd-{uuid.uuid4().hex}.scope",
            "agent_pod": agent, "agent": agent / f"cri-containerd-{uuid.uuid4().hex}.scope"}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


@pytest.fixture
def guarded(topology, kubepods, bpffs_dir, tmp_path):
    """A program set built with the node netns' cookie (what the agent in the DaemonSet builds), the
    guard on kubepods.slice, the proxy hook on the agent's pod cgroup."""
    cap = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path / "state", bpffs_dir=bpffs_dir,
                       guard_netns_cookie=netns_cookie(topology.ns_path(topology.node_ns)))
    cap.load()
    try:
        cap.attach_proxy(kubepods["agent_pod"])
        cap.attach_guard(kubepods["kubepods"])
        yield cap
    finally:
        cap.detach_all()
        cap.close()


@pytest.fixture
def pod_server(topology, kubepods):
    """A server in the pod (its netns, its container cgroup): what the agent's inbound proxy dials."""
    sock = socket_in(topology.ns_path(topology.pod_ns), kubepods["pod_container"])
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((POD_IP, POD_PORT))
        sock.listen(8)
        yield sock
    finally:
        sock.close()


@pytest.mark.netns_cookie_5_14
def test_the_agent_below_kubepods_connects_while_an_uncaptured_pod_is_refused(guarded, topology, kubepods,
                                                                              pod_server, clients):
    before = guarded.counters()
    # the agent (hostNetwork: the node netns) dials a pod on this node, as its inbound proxy does
    agent = clients(topology.ns_path(topology.node_ns), kubepods["agent"], POD_IP, POD_PORT)
    assert agent.result.get("ok"), f"the guard refused the agent's own connect: {agent.result}"
    changes = delta(before, guarded.counters())
    assert changes.get("guard_host_network") == 1 and "guard_denied" not in changes, changes

    # a pod in its own netns that the agent has not captured (yet): refused, counted
    before = guarded.counters()
    pod = clients(topology.ns_path(topology.pod_ns), kubepods["pod_container"], *REMOTE)
    assert pod.result.get("errno") == errno.EPERM, pod.result
    changes = delta(before, guarded.counters())
    assert changes.get("guard_denied") == 1 and "guard_host_network" not in changes, changes


def test_without_the_exemption_the_guard_would_refuse_the_agent(capture, topology, kubepods, pod_server, clients):
    """Why the manifests needed it: the same tree with the tier's usual set (no netns cookie)."""
    capture.attach_guard(kubepods["kubepods"])
    try:
        agent = clients(topology.ns_path(topology.node_ns), kubepods["agent"], POD_IP, POD_PORT)
        assert agent.result.get("errno") == errno.EPERM, agent.result
    finally:
        capture.detach_guard(kubepods["kubepods"])


def test_the_agent_knows_its_netns_cookie_from_5_14_and_refuses_the_exemption_with_the_fix_before(privileged):
    """On 5.14+ the cookie is the namespace's (the same for two sockets); before, the agent cannot build the
    exemption and says which setting to turn off (this branch runs in the 5.10 guest of `make test-vm`)."""
    import os

    if kernel_version(os.uname().release) >= (5, 14):
        assert own_netns_cookie() == own_netns_cookie() != 0
    else:
        with pytest.raises(EnvironmentProblem, match="capture.guard_exempt_host_network"):
            own_netns_cookie()
