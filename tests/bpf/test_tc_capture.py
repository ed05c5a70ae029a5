"""The ebpf-tc mode on a node netns with routed pods (tests/bpf/podworld.py): the program compiles
with the stub tree and loads; a pod's connection lands on the IP_TRANSPARENT listener with
getsockname() == the original destination; traffic out of scope is untouched; without a listener
captured SYNs are dropped, never forwarded; stop() and cleanup_leftovers() leave nothing behind."""

from __future__ import annotations

import errno

import pytest
from tests.bpf.bpfworld import Client, accept
from tests.bpf.podworld import GATEWAY, build_world, delta, nothing_pending

from agent.capture.tc_mode import PROGRAM, TC_PRIORITY, TcCapture, cleanup_leftovers, find_leftovers
from tests.conftest import TIME_SCALE

REMOTE = ("10.77.2.10", 5432)
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH}


@pytest.fixture(scope="module")
def world(bpf_capable):
    w = build_world(pods=2)
    try:
        yield w
    finally:
        w.remove()


@pytest.fixture(scope="module")
def capture(world, tmp_path_factory):
    """One compiled + started capture for the module (bypass 10.99.0.0/16); p1 attached, p2 never."""
    cap = TcCapture("0.0.0.0", 15001, str(tmp_path_factory.mktemp("state")), netns=world.node,
                    bypass_cidrs=["10.99.0.0/16"])
    cap.start()
    try:
        cap.attach(world.workload("p1"))
        yield cap
    finally:
        cap.stop()
    assert find_leftovers(world.node) == []


@pytest.fixture
def listener(world):
    sock = world.listener()
    try:
        yield sock
    finally:
        sock.close()


def test_program_compiles_with_the_stub_tree_loads_and_sits_on_the_pod_veth(world, capture):
    assert capture.load_seconds is not None and capture.load_seconds < 5 * TIME_SCALE
    shown = world.tc("filter", "show", "dev", world.pods["p1"].veth, "ingress")
    assert f"pref {TC_PRIORITY} bpf" in shown and PROGRAM in shown and "direct-action" in shown
    assert world.tc("filter", "show", "dev", world.pods["p2"].veth, "ingress").strip() == ""
    assert capture.attachments() == {"test/p1": world.pods["p1"].veth}


def test_pod_connection_lands_on_the_transparent_listener_with_its_original_destination(world, capture, listener):
    before = capture.counters()
    client = Client(world.pods["p1"].ns_file, None, *REMOTE)
    try:
        assert client.result["ok"], client.result
        assert client.result["peer"] == list(REMOTE)  # the app sees the peer it asked for
        conn = accept(listener)
        assert conn is not None, "the captured connection did not reach the listener"
        with conn:
            assert conn.getsockname() == REMOTE
            assert conn.getpeername() == (world.pods["p1"].ip, client.result["local"][1])
            origin = capture.origin(conn)
            assert (origin.dst_ip, origin.dst_port) == REMOTE
            assert origin.pid is None and origin.comm is None  # the tc mode cannot know the process
    finally:
        client.close()
    counted = delta(before, capture.counters())
    assert counted.get("syn_assigned") == 1 and counted.get("est_assigned", 0) >= 1, counted
    assert not counted.get("no_listener") and not counted.get("assign_failed")


def test_traffic_out_of_scope_is_untouched(world, capture, listener):
    before = capture.counters()
    # a pod without the filter: its SYN is routed as usual (the node has no route: unreachable)
    other = Client(world.pods["p2"].ns_file, None, *REMOTE, timeout=1.0)
    # a bypassed destination from the captured pod: routed as usual too
    bypassed = Client(world.pods["p1"].ns_file, None, "10.99.1.1", 80, timeout=1.0)
    try:
        assert other.result["errno"] in UNREACHABLE, other.result
        assert bypassed.result["errno"] in UNREACHABLE, bypassed.result
    finally:
        other.close()
        bypassed.close()
    assert nothing_pending(listener)
    # the node itself is never captured: the pod reaches a node listener as it is
    node_service = world.listener(port=7000, transparent=False, address=GATEWAY)
    try:
        client = Client(world.pods["p1"].ns_file, None, GATEWAY, 7000)
        try:
            conn = accept(node_service)
            assert conn is not None and conn.getsockname() == (GATEWAY, 7000)
            conn.close()
        finally:
            client.close()
        # dialling the proxy port directly is not a captured connection: no origin
        direct = Client(world.pods["p1"].ns_file, None, GATEWAY, 15001)
        try:
            conn = accept(listener)
            assert conn is not None and capture.origin(conn) is None
            conn.close()
        finally:
            direct.close()
    finally:
        node_service.close()
    counted = delta(before, capture.counters())
    assert counted.get("not_captured", 0) >= 3 and not counted.get("syn_assigned"), counted


def test_without_a_listener_captured_syns_are_dropped_not_forwarded(world, capture):
    before = capture.counters()
    client = Client(world.pods["p1"].ns_file, None, *REMOTE, timeout=0.6)
    try:
        assert not client.result["ok"] and "timed out" in client.result["error"], client.result  # not unreachable
    finally:
        client.close()
    assert delta(before, capture.counters()).get("no_listener", 0) >= 1


def test_attach_is_idempotent_and_detach_removes_the_filter(world, capture):
    p2 = world.workload("p2")
    capture.attach(p2)
    capture.attach(p2)
    assert len(world.tc_filters("p2")) == 1
    capture.detach(p2)
    capture.detach(p2)
    assert world.tc_filters("p2") == []
    assert "clsact" not in world.tc("qdisc", "show", "dev", world.pods["p2"].veth)
    assert world.pods["p1"].veth in " ".join(find_leftovers(world.node))  # p1 untouched


def test_stop_alone_removes_everything_and_a_crash_leftover_is_replaced_then_cleaned(bpf_capable, tmp_path):
    world = build_world(pods=1)
    try:
        crashed = TcCapture("0.0.0.0", 15001, str(tmp_path), netns=world.node)
        crashed.start()
        crashed.attach(world.workload("p1"))
        crashed.abandon()  # the process "dies": no stop(); the filter keeps the program alive
        left = find_leftovers(world.node)
        assert len(left) == 3, left  # filter, rule, route
        # fail-closed while no agent runs: a captured SYN finds no listener and is dropped
        client = Client(world.pods["p1"].ns_file, None, *REMOTE, timeout=0.6)
        assert "timed out" in client.result.get("error", ""), client.result
        client.close()

        restarted = TcCapture("0.0.0.0", 15001, str(tmp_path), netns=world.node)
        restarted.start()
        restarted.attach(world.workload("p1"))  # replaces the leftover in place
        assert len(world.tc_filters("p1")) == 1
        restarted.stop()
        assert find_leftovers(world.node) == []
        assert "clsact" not in world.tc("qdisc", "show", "dev", world.pods["p1"].veth)

        crashed = TcCapture("0.0.0.0", 15001, str(tmp_path), netns=world.node)
        crashed.start()
        crashed.attach(world.workload("p1"))
        crashed.abandon()
        assert cleanup_leftovers(world.node, dry_run=True) == find_leftovers(world.node) != []  # removes nothing
        removed = cleanup_leftovers(world.node)
        assert any(PROGRAM in item for item in removed) and any("clsact" in item for item in removed)
        assert any("ip rule" in item for item in removed) and any("ip route local" in item for item in removed)
        assert cleanup_leftovers(world.node) == [] and find_leftovers(world.node) == []
    finally:
        world.remove()
