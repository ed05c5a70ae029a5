"""The node guard on the pods cgroup: pods that are not captured (yet) cannot connect in plaintext.

Layout (per test): <test cgroup>/pods/{a,b} with the guard on pods/, the capture on pods/a only,
the proxy's getsockopt hook on <test cgroup>/proxy (outside pods/, as the agent must be).
The pod netns routes everything to the node, which has no route onward: a connect that is neither
captured nor refused fails with an unreachable/timeout errno, never EPERM.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from agent.capture import read_origin
from tests.bpf.bpfworld import NODE_IP, REDIRECT_PORT, socket_in
from tests.bpf.bpfworld import accept
from tests.bpf.test_connect_capture import NOT_CAPTURED_ERRNOS, REMOTE, attached_table, delta


@pytest.fixture
def guarded(capture, cgroups, proxy_listener):
    capture.set_capture_cidrs(["10.77.0.0/16"])
    capture.attach_proxy(cgroups["proxy"])
    capture.attach_guard(cgroups["pods"])
    capture.attach_pod(cgroups["pod_a"])
    try:
        yield capture
    finally:
        capture.detach_pod(cgroups["pod_a"])
        capture.detach_pod(cgroups["pod_b"])
        capture.detach_guard(cgroups["pods"])
        capture.detach_proxy(cgroups["proxy"])


def test_captured_pod_passes_the_guard_because_its_own_hooks_run_first(guarded, topology, cgroups, proxy_listener,
                                                                       clients):
    """Programs of a descendant cgroup run before its ancestors' (checked here on this kernel): the
    pod's connect4 marks the socket, then the guard on pods/ sees the mark and lets it through."""
    before = guarded.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod_a"], *REMOTE)
    assert client.result["ok"], client.result
    conn = accept(proxy_listener)
    assert conn is not None
    conn.close()
    outside = clients(topology.ns_path(topology.pod_ns), cgroups["pod_a"], "10.88.1.1", 5432, timeout=1.0)
    assert outside.result.get("errno") in NOT_CAPTURED_ERRNOS, outside.result  # bypass: not refused
    changes = delta(before, guarded.counters())
    assert changes.get("captured") == 1 and changes.get("not_captured") == 1
    assert "guard_denied" not in changes


def test_uncaptured_pod_gets_eperm_and_is_counted(guarded, topology, cgroups, proxy_listener, clients):
    before = guarded.counters()
    pod_ns = topology.ns_path(topology.pod_ns)
    for ip in (REMOTE[0], "10.88.1.1"):  # a mesh destination, and one outside the capture CIDRs
        client = clients(pod_ns, cgroups["pod_b"], ip, 5432)
        assert client.result.get("errno") == errno.EPERM, client.result
    mapped = clients(pod_ns, cgroups["pod_b"], f"::ffff:{REMOTE[0]}", REMOTE[1])  # dual-stack socket
    assert mapped.result.get("errno") == errno.EPERM, mapped.result
    native6 = clients(pod_ns, cgroups["pod_b"], "fd00:77::10", 5432)
    assert native6.result.get("errno") == errno.EPERM, native6.result
    assert accept(proxy_listener, timeout=0.2) is None
    changes = delta(before, guarded.counters())
    assert changes.get("guard_denied") == 4, changes
    assert "captured" not in changes


def test_uncaptured_pod_keeps_loopback_redirect_address_and_udp(guarded, topology, cgroups, proxy_listener, clients):
    before = guarded.counters()
    pod_ns = topology.ns_path(topology.pod_ns)
    loop = clients(pod_ns, cgroups["pod_b"], "127.0.0.1", 5432)
    assert loop.result.get("errno") == errno.ECONNREFUSED, loop.result
    direct = clients(pod_ns, cgroups["pod_b"], NODE_IP, REDIRECT_PORT)
    assert direct.result["ok"], direct.result
    conn = accept(proxy_listener)
    assert conn is not None
    conn.close()
    with socket_in(pod_ns, cgroups["pod_b"], socket.SOCK_DGRAM) as udp:
        udp.connect(REMOTE)  # DNS and other UDP are never captured, so never refused
    assert delta(before, guarded.counters()).get("guard_exempt") == 2


def test_a_pod_the_agent_does_not_know_is_refused_and_attaching_it_opens_it(guarded, topology, cgroups,
                                                                            proxy_listener, clients):
    pod_ns = topology.ns_path(topology.pod_ns)
    newcomer = cgroups["pods"] / "c"   # created after the guard went on: inherits it
    nested = cgroups["pod_a"] / "ctr"  # a container cgroup below a captured pod: captured too
    newcomer.mkdir()
    nested.mkdir()
    try:
        refused = clients(pod_ns, newcomer, *REMOTE)
        assert refused.result.get("errno") == errno.EPERM, refused.result
        inner = clients(pod_ns, nested, *REMOTE)
        assert inner.result["ok"], inner.result
        with accept(proxy_listener) as conn:  # attributed to the exact (container) cgroup, found below the pod's
            origin = read_origin(conn)
            assert origin is not None and origin.cgroup_id == os.stat(nested).st_ino
            assert origin.pid == inner.result["pid"]
        guarded.attach_pod(newcomer)  # the agent learns of it: captured from now on
        admitted = clients(pod_ns, newcomer, *REMOTE)
        assert admitted.result["ok"], admitted.result
        accept(proxy_listener).close()
    finally:
        guarded.detach_pod(newcomer)  # the cgroups go with the per-test cgroup tree


def test_guard_is_one_program_per_hook_and_detaches_cleanly(capture, cgroups):
    capture.attach_guard(cgroups["pods"])
    capture.attach_guard(cgroups["pods"])
    shown = attached_table(cgroups["pods"])
    assert shown.count("tcpmesh_guard4") == 1 and shown.count("tcpmesh_guard6") == 1, shown
    assert len(capture.detach_guard(cgroups["pods"])) == 2
    assert "tcpmesh" not in attached_table(cgroups["pods"])


def test_a_socket_retrying_after_its_pod_was_detached_gets_no_stale_pass(guarded, topology, cgroups):
    """The pod hooks' mark is consumed by the guard at each connect(): a socket that connected once
    while its pod was captured, and retries after the pod's hooks are gone, is refused."""
    with socket_in(topology.ns_path(topology.pod_ns), cgroups["pod_a"]) as sock:
        with pytest.raises(ConnectionRefusedError):  # marked by the pod hooks, passed by the guard
            sock.connect(("127.0.0.1", 9))
        guarded.detach_pod(cgroups["pod_a"])
        before = guarded.counters()
        with pytest.raises(PermissionError):
            sock.connect(REMOTE)
    assert delta(before, guarded.counters()).get("guard_denied") == 1
