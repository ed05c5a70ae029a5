"""Fixtures of the bpf tier: one pinned ConnectCapture per module, a node/pod netns pair per test,
and ways to make sockets and processes that live in a given netns and cgroup.

The world each test builds: a "node" netns and a "pod" netns joined by a veth (10.200.1.1 on the
node side, 10.200.1.2 in the pod, pod default route via the node), and child cgroups of the
per-test cgroup from tests/conftest.py. Every 10.x address exists only inside those namespaces;
nothing touches the root netns or the root cgroup; everything is removed in ``finally``.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.bpf.bpfworld import NETNS_DIR, NODE_IP, REDIRECT_PORT, Client, mesh_capture, plumb_node_and_pod, remove_namespaces, socket_in


# marker -> (the first kernel that has the feature, what the feature is); docs/kernels.md
KERNEL_FEATURE_MARKERS = {
    "slots_6_12": ((6, 12), "slot-array tests (ebpf-connect uses the slot arrays only from 6.12)"),
    "netns_cookie_5_14": ((5, 14), "host-network guard exemption tests (SO_NETNS_COOKIE is 5.14+)"),
}


def kernel_version(release: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def pytest_collection_modifyitems(config, items):
    """Tests marked with a feature of KERNEL_FEATURE_MARKERS need a kernel that has it: on older kernels
    they are deselected (not skipped: nothing is missing, the path does not exist there; the product
    refuses the setting with the fix, tested by ``*_before_*`` tests), and the run says so."""
    release = os.uname().release
    version = kernel_version(release)
    for marker, (since, what) in KERNEL_FEATURE_MARKERS.items():
        if version >= since:
            continue
        kept, dropped = [], []
        for item in items:
            (dropped if item.get_closest_marker(marker) else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
            print(f"\nkernel {release} < {since[0]}.{since[1]}: {len(dropped)} {what} deselected (docs/kernels.md)")


@dataclass(frozen=True)
class Topology:
    node_ns: str
    pod_ns: str

    def ns_path(self, name: str) -> str:
        return f"{NETNS_DIR}/{name}"


@pytest.fixture
def topology(privileged):
    tag = uuid.uuid4().hex[:6]
    node_ns, pod_ns = f"tmbpf-n-{tag}", f"tmbpf-p-{tag}"
    try:
        plumb_node_and_pod(node_ns, pod_ns, f"tmh{tag}", f"tmp{tag}")
        yield Topology(node_ns, pod_ns)
    finally:
        remove_namespaces(pod_ns, node_ns)


@pytest.fixture(scope="module")
def bpffs_dir(bpf_capable):
    """A pin directory of the module's own under /sys/fs/bpf (mounted if needed), removed afterwards."""
    from agent.bpf import pins

    path = Path(pins.BPFFS_MOUNT) / f"tcpmesh-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pins.ensure_bpffs(str(path))
    try:
        yield path
    finally:
        pins.remove_tree(path)


@pytest.fixture(scope="module")
def capture(bpffs_dir, tmp_path_factory):
    """One program set for the module, loaded by the loader process and pinned in ``bpffs_dir``;
    tests reset its CIDRs and use counter deltas. Whatever it attached is detached afterwards."""

    cap = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path_factory.mktemp("state"),
                       bpffs_dir=bpffs_dir)
    cap.load()
    try:
        yield cap
    finally:
        cap.detach_all()
        cap.close()


@pytest.fixture
def cgroups(test_cgroup):
    """pod/, proxy/ and other/ children of the per-test cgroup; pods/ holds pods/a and pods/b (the
    guard's tests: the node guard goes on pods/, the agent's proxy stays outside it)."""
    dirs = {name: test_cgroup / name for name in ("pod", "proxy", "other")}
    dirs.update({"pods": test_cgroup / "pods", "pod_a": test_cgroup / "pods" / "a", "pod_b": test_cgroup / "pods" / "b"})
    for path in dirs.values():
        path.mkdir(exist_ok=True)
    return dirs


@pytest.fixture
def proxy_listener(topology, cgroups):
    """The stand-in proxy's listener: REDIRECT_PORT on the node netns, in the proxy cgroup, non-blocking."""
    sock = socket_in(topology.ns_path(topology.node_ns), cgroups["proxy"])
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", REDIRECT_PORT))
        sock.listen(64)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def clients():
    """Start clients with ``clients(netns_file, cgroup, ip, port)``; all are ended afterwards."""
    started: list[Client] = []

    def start(*args, **kwargs) -> Client:
        client = Client(*args, **kwargs)
        started.append(client)
        return client

    try:
        yield start
    finally:
        for client in started:
            client.close()
