"""Following the node's addresses: agent.capture.local_addresses.address_changed (pure),
agent.control.node_addresses.NodeAddressFollower (a burst of notifications is one re-read) and
WorkloadController.refresh_node_addresses (an address added or removed changes the nodePort/hostPort frontends
the capture is given, with no registry change)."""

from __future__ import annotations

import ipaddress
import socket

import yaml

from agent.capture import local_addresses as la
from agent.control.node_addresses import COALESCE_SECONDS, NodeAddressFollower
from agent.control.workloads import WorkloadController
from tests.unit.test_local_addresses import message, new_address

TD = "na.test"


def test_an_added_or_removed_address_is_a_change_and_other_notifications_are_not():
    added = new_address(socket.AF_INET, local=ipaddress.IPv4Address("10.78.0.1").packed)
    removed = message(la.RTM_DELADDR, la.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 2))
    route = message(24, b"\0" * 12)  # RTM_NEWROUTE: not ours
    assert la.address_changed(added) and la.address_changed(route + removed)
    assert not la.address_changed(route) and not la.address_changed(b"")


class Notifications:
    """Batches handed to ``drain`` one call at a time: True for an address change."""

    def __init__(self) -> None:
        self.pending: list[bool] = []
        self.closed = False

    def fileno(self) -> int:
        return 99

    def drain(self) -> bool:
        batch, self.pending = self.pending, []
        return any(batch)

    def close(self) -> None:
        self.closed = True


class Loop:
    """The loop's three calls the follower makes; timers fire when the test says."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}
        self.timers: list = []

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_later(self, delay, callback):
        loop = self

        class Handle:
            def cancel(self) -> None:
                loop.timers.remove(entry)

        entry = (delay, callback)
        self.timers.append(entry)
        return Handle()

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


def test_a_burst_of_notifications_is_one_re_read_and_a_later_one_another():
    loop, events, reads = Loop(), Notifications(), []
    follower = NodeAddressFollower(loop, events, lambda: reads.append(1))
    follower.start()
    readable = loop.readers[99]
    for _ in range(200):        # a flood (kube-ipvs0 taking every ClusterIP): the socket readable 200 times
        events.pending.append(True)
        readable()
    assert [delay for delay, _ in loop.timers] == [COALESCE_SECONDS]  # one timer for the whole burst
    loop.fire()
    assert reads == [1]
    events.pending.append(False)  # a notification that is no address change: nothing
    readable()
    assert loop.timers == []
    events.pending.append(True)
    readable()
    loop.fire()
    assert reads == [1, 1]
    events.pending.append(True)
    readable()
    follower.close()              # a pending re-read goes with the follower
    assert loop.timers == [] and loop.readers == {} and events.closed


class Capture:
    def __init__(self) -> None:
        self.node_ports: list[tuple[str, int]] = []
        self.applied = 0

    def set_mesh_destinations(self, workloads, services=(), node_ports=()) -> None:
        self.node_ports = sorted(node_ports)
        self.applied += 1

    def attach(self, workload) -> None:
        pass

    def detach(self, workload) -> None:
        pass


class Identities:
    def ensure(self, identities) -> None:
        pass


def controller(tmp_path, addresses: list[str]) -> tuple[WorkloadController, Capture]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "trust_domain": TD, "nodes": [{"name": "node1", "address": "10.76.0.1"}],
        "workloads": [{"name": "db-1", "namespace": "shop", "service_account": "db", "ip": "10.77.1.11",
                       "node": "node1", "host_ports": [{"port": 31001, "target_port": 5432}]}],
        "services": [{"name": "db", "namespace": "shop", "addresses": ["10.96.0.10"],
                      "ports": [{"port": 5432, "target_port": 5432, "node_port": 30432}],
                      "endpoints": [{"workload": "shop/db-1", "ready": True}]}]}))
    registry.chmod(0o600)
    capture = Capture()
    workloads = WorkloadController("node1", TD, str(registry), str(tmp_path / "runtime.json"), capture, Identities(),
                                   own_addresses=lambda: list(addresses))
    workloads.load()
    return workloads, capture


def test_an_address_the_node_gets_or_loses_changes_the_frontends_without_a_registry_change(tmp_path):
    addresses = ["10.76.0.1"]
    workloads, capture = controller(tmp_path, addresses)
    assert capture.node_ports == [("10.76.0.1", 30432), ("10.76.0.1", 31001)]
    assert not workloads.refresh_node_addresses()  # nothing changed: nothing applied
    assert capture.applied == 1
    addresses.append("10.78.0.1")
    assert workloads.refresh_node_addresses()
    assert capture.node_ports == [("10.76.0.1", 30432), ("10.76.0.1", 31001), ("10.78.0.1", 30432), ("10.78.0.1", 31001)]
    assert workloads.snapshot.service_at("10.78.0.1", 30432) is not None  # the data path resolves it too
    assert workloads.snapshot.host_port_at("10.78.0.1", 31001) is not None
    addresses.remove("10.78.0.1")
    assert workloads.refresh_node_addresses()
    assert capture.node_ports == [("10.76.0.1", 30432), ("10.76.0.1", 31001)]
    assert workloads.snapshot.service_at("10.78.0.1", 30432) is None
