"""Only the mesh is captured (issue #14, item 3): the connect hooks redirect a TCP connect only when
its destination is in tcpmesh_mesh_dsts; every other one leaves from the pod itself — the server
sees the pod's address — or, under policy.outbound_passthrough DENY, fails with EPERM at connect().
Either way one event (pid, comm, cgroup, destination, decision) reaches the agent's ring buffer.
Before ABI 5 every connect inside the capture CIDRs went to the proxy: the first test fails there
(the listener outside the mesh never sees the pod; the proxy gets the connection instead).
"""

from __future__ import annotations

import errno
import select
import socket
import subprocess
import time

import pytest

from agent.capture import abi
from agent.capture.meshdsts import destination
from tests.bpf.bpfworld import MESH_PREFIX, POD_IP, REDIRECT_PORT, socket_in

OUTSIDE_IP = "10.99.0.1"  # a second address of the node netns: outside the mesh, not the redirect address
OUTSIDE_PORT = 7000


@pytest.fixture
def world(capture, topology, cgroups):
    """The capture on the pod cgroup, a proxy listener, and a server outside the mesh on the node."""
    subprocess.run(["ip", "-n", topology.node_ns, "addr", "add", f"{OUTSIDE_IP}/32", "dev", "lo"], check=True)
    node = topology.ns_path(topology.node_ns)
    proxy = socket_in(node, cgroups["proxy"])
    server = socket_in(node, None)
    reader = None
    try:
        for sock, port in ((proxy, REDIRECT_PORT), (server, OUTSIDE_PORT)):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(16)
            sock.setblocking(False)
        capture.set_capture_cidrs(["0.0.0.0/0"])
        capture.set_mesh_destinations([destination(MESH_PREFIX)])
        capture.set_passthrough_deny(False)
        capture.attach_proxy(cgroups["proxy"])
        capture.attach_pod(cgroups["pod"])
        events: list = []
        reader = capture.egress_reader(events.append)
        yield capture, proxy, server, reader, events
    finally:
        if reader is not None:
            reader.close()
        capture.detach_pod(cgroups["pod"])
        capture.detach_proxy(cgroups["proxy"])
        capture.set_passthrough_deny(False)
        capture.set_mesh_destinations([destination(MESH_PREFIX)])
        proxy.close()
        server.close()


def accepted_peer(listener: socket.socket, timeout: float = 2.0) -> str | None:
    if not select.select([listener], [], [], timeout)[0]:
        return None
    conn, peer = listener.accept()
    conn.close()
    return peer[0]


def event_of(reader, events: list, pid: int, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([reader.fileno()], [], [], 0.1)
        reader.drain()
        for event in events:
            if event.pid == pid:
                return event
    raise AssertionError(f"no egress event for pid {pid}: {events}")


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_a_destination_outside_the_mesh_is_reached_from_the_pods_own_address(world, topology, cgroups, clients):
    capture, proxy, server, reader, events = world
    before = capture.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], OUTSIDE_IP, OUTSIDE_PORT)
    assert client.result["ok"], client.result
    assert client.result["peer"] == [OUTSIDE_IP, OUTSIDE_PORT]
    assert accepted_peer(server) == POD_IP
    assert accepted_peer(proxy, timeout=0.2) is None, "a connection outside the mesh went to the proxy"
    changes = delta(before, capture.counters())
    assert changes.get("outside_mesh_allowed") == 1 and "captured" not in changes, changes
    event = event_of(reader, events, client.result["pid"])
    assert (event.destination_ip, event.destination_port, event.denied) == (OUTSIDE_IP, OUTSIDE_PORT, False)
    assert event.comm == client.result["comm"] and event.cgroup_id == cgroups["pod"].stat().st_ino


def test_passthrough_deny_refuses_at_connect_with_eperm(world, topology, cgroups, clients):
    capture, proxy, server, reader, events = world
    capture.set_passthrough_deny(True)
    before = capture.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], OUTSIDE_IP, OUTSIDE_PORT)
    assert client.result.get("errno") == errno.EPERM, client.result
    assert accepted_peer(server, timeout=0.3) is None and accepted_peer(proxy, timeout=0.1) is None
    changes = delta(before, capture.counters())
    assert changes.get("outside_mesh_denied") == 1 and "outside_mesh_allowed" not in changes, changes
    event = event_of(reader, events, client.result["pid"])
    assert event.denied and event.destination_ip == OUTSIDE_IP
    # the mesh itself is still captured under DENY
    meshed = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], "10.77.2.10", 5432)
    assert meshed.result["ok"], meshed.result
    assert accepted_peer(proxy) == POD_IP


def test_an_address_and_port_entry_and_a_hole_decide_per_destination(world, topology, cgroups, clients):
    capture, proxy, server, reader, events = world
    capture.set_mesh_destinations([destination(OUTSIDE_IP, OUTSIDE_PORT, abi.DST_SERVICE),
                                   destination(MESH_PREFIX), destination("10.77.9.9", kind=abi.DST_OUTSIDE)])
    pod = topology.ns_path(topology.pod_ns)
    captured = clients(pod, cgroups["pod"], OUTSIDE_IP, OUTSIDE_PORT)  # that port of that address: in the mesh
    assert captured.result["ok"] and accepted_peer(proxy) == POD_IP
    assert accepted_peer(server, timeout=0.2) is None
    before = capture.counters()
    other_port = clients(pod, cgroups["pod"], OUTSIDE_IP, OUTSIDE_PORT + 1, timeout=1.0)  # another port: outside
    hole = clients(pod, cgroups["pod"], "10.77.9.9", 5432, timeout=1.0)  # a hole in the mesh prefix: outside
    for client in (other_port, hole):
        assert not client.result["ok"] and client.result.get("errno") != errno.EPERM, client.result
    assert accepted_peer(proxy, timeout=0.2) is None
    assert delta(before, capture.counters()).get("outside_mesh_allowed") == 2
