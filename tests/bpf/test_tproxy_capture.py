"""The iptables mode on a node netns with routed pods (tests/bpf/podworld.py), once per netfilter
backend installed here (nft, iptables-nft, iptables-legacy): a pod's connection lands on the
IP_TRANSPARENT listener with getsockname() == the original destination, other traffic is untouched,
no listener means dropped, and stop() — or cleanup_leftovers() after a crash — leaves nothing.
Needs root and namespaces, not bcc."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from tests.bpf.bpfworld import Client
from tests.bpf.bpfworld import accept
from tests.bpf.podworld import GATEWAY, build_world, nothing_pending

from agent.capture import netfilter
from agent.capture.tproxy_mode import TproxyCapture, cleanup_leftovers, find_leftovers
from tests.conftest import skip_or_fail

REMOTE = ("10.77.2.10", 5432)
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH}


@pytest.fixture
def world(privileged):
    w = build_world(pods=2)
    try:
        yield w
    finally:
        w.remove()


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        skip_or_fail(f"{binary} is not installed: apt-get install iptables nftables (make setup does)")


@pytest.mark.parametrize("backend", netfilter.BACKEND_ORDER)
def test_each_backend_captures_a_pod_and_stop_removes_everything(world, backend):
    require(backend)
    capture = TproxyCapture("0.0.0.0", 15001, netns=world.node, backends=[backend])
    listener = world.listener()
    try:
        capture.start()
        assert capture.backend.name == backend and capture.backend_errors == {}
        capture.attach(world.workload("p1"))
        capture.attach(world.workload("p1"))  # idempotent
        client = Client(world.pods["p1"].ns_file, None, *REMOTE)
        try:
            assert client.result["ok"] and client.result["peer"] == list(REMOTE), client.result
            conn = accept(listener)
            assert conn is not None, "the captured connection did not reach the listener"
            with conn:
                assert conn.getsockname() == REMOTE
                assert conn.getpeername() == (world.pods["p1"].ip, client.result["local"][1])
                origin = capture.origin(conn)
                assert (origin.dst_ip, origin.dst_port, origin.pid) == (*REMOTE, None)  # no pid in this mode
        finally:
            client.close()
        # not captured: a pod that is not attached, and the node's own address
        other = Client(world.pods["p2"].ns_file, None, *REMOTE, timeout=1.0)
        direct = Client(world.pods["p1"].ns_file, None, GATEWAY, 15001)
        try:
            assert other.result["errno"] in UNREACHABLE, other.result
            conn = accept(listener)
            assert conn is not None and capture.origin(conn) is None  # dialled the proxy port itself
            conn.close()
        finally:
            other.close()
            direct.close()
        assert nothing_pending(listener)
        assert len(find_leftovers(world.node)) >= 3
    finally:
        listener.close()
        capture.stop()
    assert find_leftovers(world.node) == []


def test_without_a_listener_the_syn_is_dropped_and_leftovers_are_cleaned(world):
    require("nft")
    crashed = TproxyCapture("0.0.0.0", 15001, netns=world.node)
    crashed.start()
    crashed.attach(world.workload("p1"))
    # the agent "dies" here: its rules stay; a captured SYN finds no listener and goes nowhere
    client = Client(world.pods["p1"].ns_file, None, *REMOTE, timeout=0.6)
    try:
        assert not client.result["ok"] and "timed out" in client.result["error"], client.result
    finally:
        client.close()
    removed = cleanup_leftovers(world.node)
    assert any("nft table inet tcpmesh" in item for item in removed)
    assert any("ip rule" in item for item in removed) and any("ip route local" in item for item in removed)
    assert cleanup_leftovers(world.node) == [] and find_leftovers(world.node) == []


def test_a_missing_backend_falls_back_to_the_next_and_says_why(world, tmp_path, monkeypatch):
    require("iptables-nft")
    only = tmp_path / "bin"
    only.mkdir()
    for tool in ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"):
        os.symlink(shutil.which(tool), only / tool)
    monkeypatch.setenv("PATH", str(only))  # no nft, no iptables-legacy
    capture = TproxyCapture("0.0.0.0", 15001, netns=world.node)
    try:
        capture.start()
        assert capture.backend.name == "iptables-nft"
        assert "nft is not installed (not found in PATH)" in capture.backend_errors["nft"]
    finally:
        capture.stop()
    monkeypatch.undo()
    assert find_leftovers(world.node) == []
