"""The ebpf-connect mode end to end on a node/pod netns pair: redirect, origin, attribution, scope.

A listener plays the proxy: it lives in the node netns on 10.200.1.1:15001 and in its own
"proxy" cgroup (never the pod's). Clients are separate processes started inside the pod netns,
and inside or outside the pod cgroup.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

from agent.capture import abi, read_origin, read_original_dst
from agent.capture.connect_mode import ROLE_POD, ROLE_PROXY, connect_sets_cb_flags, hooks_for
from agent.bpf.errors import BpfLoadError
from agent.errors import ConfigError
from tests.bpf.attached import cgroup_table
from tests.bpf.bpfworld import NODE_IP, REDIRECT_PORT, accept, mesh_capture, socket_in
from tests.conftest import TIME_SCALE

REMOTE = ("10.77.2.10", 5432)
USES_SLOTS = connect_sets_cb_flags(os.uname().release)   # Linux >= 6.12: the slot arrays are used
SO_COOKIE = 57
TCP_CLOSE_WAIT = 8
NOT_CAPTURED_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT, None}


@pytest.fixture
def attached(capture, cgroups, proxy_listener):
    """The capture on the pod cgroup and the origin hook on the proxy cgroup; CIDRs reset."""
    capture.set_capture_cidrs(["10.77.0.0/16"])
    capture.attach_proxy(cgroups["proxy"])
    capture.attach_pod(cgroups["pod"])
    try:
        yield capture
    finally:
        capture.detach_pod(cgroups["pod"])
        capture.detach_proxy(cgroups["proxy"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def attached_table(path: Path) -> str:
    """The programs attached to ``path``, one line each after a header, as `bpftool cgroup show` prints
    them — asked of the kernel directly (tests/bpf/attached.py; Debian 12's bpftool fails on 5.10)."""
    return cgroup_table(path)


def test_stub_tree_compiles_and_loads_in_the_loader_process(capture, tmp_path):
    kstub = tmp_path / "bcc-kstub"
    from agent.bpf import kstub as ks

    ks.materialise(kstub)
    assert (kstub / "include/linux/kconfig.h").is_file()
    assert (kstub / "include/uapi/linux").is_symlink()
    assert "BCC_KERNEL_SOURCE" not in os.environ  # only set around the compile
    assert capture.load_seconds is not None and capture.load_seconds < 10 * TIME_SCALE
    assert capture.adopted is False and capture.loader_result.compiled
    assert set(capture.counters()) >= {"captured", "not_captured", "origin_missing", "map_update_failed"}


def test_pod_connect_is_redirected_with_origin(attached, topology, cgroups, proxy_listener, clients):
    before = attached.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE)
    assert client.result["ok"], client.result
    conn = accept(proxy_listener)
    assert conn is not None, "the captured connection did not reach the listener"
    with conn:
        with pytest.raises(OSError):  # buffer too small for the record: no answer, kernel's errno
            conn.getsockopt(socket.SOL_IP, 0x746D, 16)
        origin = read_origin(conn)  # a short buffer consumed nothing
        assert origin is not None
        assert (origin.dst_ip, origin.dst_port) == REMOTE
        assert origin.pid == client.result["pid"]
        assert origin.comm == client.result["comm"] == "tm-client"
        assert origin.uid == 0
        assert origin.cgroup_id == os.stat(cgroups["pod"]).st_ino
        assert origin.cookie != 0
        assert read_original_dst(conn) is None  # one answer per connection: it was consumed
        # the proxy sees the client's real address; the client sees the peer it asked for
        assert list(conn.getpeername()) == client.result["local"]
        assert tuple(client.result["peer"]) == REMOTE
    changes = delta(before, attached.counters())
    assert changes.get("captured") == 1
    assert changes.get("rekeyed") == 1
    assert changes.get("origin_answered") == 1 and changes.get("origin_claimed") == 1
    assert "origdst_answered" not in changes and changes.get("origin_missing") == 1
    assert changes.get("peername_rewritten", 0) >= 1
    assert changes.get("optlen_short") == 1


def test_original_dst_alone_is_answered_too(attached, topology, cgroups, proxy_listener, clients):
    """SO_ORIGINAL_DST (netfilter's option, for code written for iptables REDIRECT) as the one question."""
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE)
    assert client.result["ok"], client.result
    conn = accept(proxy_listener)
    assert conn is not None
    with conn:
        assert read_original_dst(conn) == REMOTE
        assert read_origin(conn) is None


def test_origin_is_found_after_the_client_sent_data_and_fin(attached, topology, cgroups, proxy_listener):
    """The proxy asks after accept(), when the client may have sent its request and even half-closed:
    the key is rebuilt from the accepted socket whatever it has received since the handshake."""
    with connect_from(topology, cgroups["pod"], REMOTE) as client:
        client.sendall(b"x" * 70_000)  # more than one segment, and a window update or two
        client.shutdown(socket.SHUT_WR)
        conn = accept(proxy_listener)
        assert conn is not None
        with conn:
            for _ in range(100):  # until the FIN is in: tcpi_state (first byte of TCP_INFO) CLOSE_WAIT
                if conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE_WAIT:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the client's FIN did not arrive")
            origin = read_origin(conn)
            assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            assert received == b"x" * 70_000


def test_dual_stack_socket_to_v4_mapped_address_is_captured(attached, topology, cgroups, proxy_listener, clients):
    """AF_INET6 sockets reach IPv4 peers as ::ffff:a.b.c.d (JVM, Go): connect6 must capture them."""
    before = attached.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], f"::ffff:{REMOTE[0]}", REMOTE[1])
    assert client.result["ok"], client.result
    assert tuple(client.result["peer"]) == (f"::ffff:{REMOTE[0]}", REMOTE[1])
    conn = accept(proxy_listener)
    assert conn is not None, "the captured v4-mapped connection did not reach the listener"
    with conn:
        origin = read_origin(conn)
        assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
        assert origin.pid == client.result["pid"]
        assert conn.getpeername()[0] == client.result["local"][0].removeprefix("::ffff:")
    changes = delta(before, attached.counters())
    assert changes.get("captured") == 1 and changes.get("v4mapped") == 1
    assert changes.get("rekeyed") == 1 and changes.get("origin_answered") == 1


REMOTE6 = ("fd00:77::10", 5432)  # in the tier's mesh (bpfworld.MESH_PREFIX6)


def test_native_ipv6_in_the_mesh_is_captured_with_its_ipv6_origin(attached, topology, cgroups, proxy_listener,
                                                                  clients):
    """Issue #14 item 4: before ABI 6 connect6 let native IPv6 through untouched (plaintext)."""
    before = attached.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE6)
    assert client.result["ok"], client.result
    assert tuple(client.result["peer"]) == REMOTE6  # getpeername6 shows what the app asked for
    conn = accept(proxy_listener)
    assert conn is not None, "the captured IPv6 connection did not reach the listener"
    with conn:
        with pytest.raises(OSError):  # SOL_IP/SO_ORIGINAL_DST cannot hold it: refused, nothing consumed
            conn.getsockopt(abi.SOL_IP, abi.SO_ORIGINAL_DST, 16)
        raw = conn.getsockopt(abi.SOL_IPV6, abi.IP6T_SO_ORIGINAL_DST, ctypes.sizeof(abi.SockaddrIn6))
        sa = abi.SockaddrIn6.from_buffer_copy(raw)
        assert sa.family == socket.AF_INET6 and abi.net_u16_to_port(sa.port) == REMOTE6[1]
        assert socket.inet_ntop(socket.AF_INET6, bytes(sa)[8:24]) == REMOTE6[0]
    changes = delta(before, attached.counters())
    assert changes.get("captured") == 1 and changes.get("captured6") == 1, changes
    assert changes.get("family_mismatch") == 1 and changes.get("origdst_answered") == 1, changes


def test_the_proxy_reads_an_ipv6_origin(attached, topology, cgroups, proxy_listener, clients):
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE6)
    assert client.result["ok"], client.result
    conn = accept(proxy_listener)
    assert conn is not None
    with conn:
        origin = read_origin(conn)
    assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE6
    assert origin.pid == client.result["pid"]


def test_native_ipv6_outside_the_mesh_is_left_alone(attached, topology, cgroups, proxy_listener, clients):
    before = attached.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], "2001:db8::1", 5432, timeout=1.0)
    assert not client.result["ok"], client.result  # no IPv6 route in this world: not via the proxy either
    assert accept(proxy_listener, timeout=0.2) is None
    assert delta(before, attached.counters()).get("outside_mesh_allowed") == 1


def test_ipv6_meshing_off_refuses_ipv6_mesh_destinations_at_connect(attached, topology, cgroups, proxy_listener,
                                                                    clients):
    attached.set_ipv6(False)
    try:
        before = attached.counters()
        client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE6)
        assert client.result.get("errno") == errno.EPERM, client.result
        assert accept(proxy_listener, timeout=0.2) is None
        assert delta(before, attached.counters()).get("ipv6_refused") == 1
        ipv4 = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], *REMOTE)  # IPv4 is still meshed
        assert ipv4.result["ok"], ipv4.result
    finally:
        attached.set_ipv6(True)


def test_udp_connect_is_not_captured(attached, topology, cgroups):
    before = attached.counters()
    with socket_in(topology.ns_path(topology.pod_ns), cgroups["pod"], socket.SOCK_DGRAM) as udp:
        udp.connect(REMOTE)
        assert udp.getpeername() == REMOTE
    changes = delta(before, attached.counters())
    assert changes.get("not_tcp") == 1 and "captured" not in changes


def test_same_netns_outside_pod_cgroup_is_not_redirected(attached, topology, cgroups, proxy_listener, clients):
    before = attached.counters()
    client = clients(topology.ns_path(topology.pod_ns), cgroups["other"], *REMOTE, timeout=1.0)
    assert not client.result["ok"], client.result
    assert client.result.get("errno") in NOT_CAPTURED_ERRNOS, client.result
    assert accept(proxy_listener, timeout=0.2) is None
    assert attached.counters()["captured"] == before["captured"]


def test_destination_outside_capture_cidrs_is_not_captured(attached, topology, cgroups, proxy_listener, clients):
    attached.set_capture_cidrs(["10.77.0.0/16"], bypass_cidrs=["10.77.9.0/24"])
    before = attached.counters()
    for ip in ("10.88.1.1", "10.77.9.9"):  # outside every prefix; inside a bypass hole
        client = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], ip, 5432, timeout=1.0)
        assert not client.result["ok"], client.result
        assert client.result.get("errno") in NOT_CAPTURED_ERRNOS, client.result
    assert accept(proxy_listener, timeout=0.2) is None
    changes = delta(before, attached.counters())
    assert changes.get("not_captured") == 2
    assert "captured" not in changes


def test_loopback_and_redirect_address_are_never_captured(attached, topology, cgroups, proxy_listener, clients):
    attached.set_capture_cidrs(["0.0.0.0/0"])
    before = attached.counters()
    loop = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], "127.0.0.1", 5432, timeout=1.0)
    assert loop.result.get("errno") == errno.ECONNREFUSED, loop.result
    direct = clients(topology.ns_path(topology.pod_ns), cgroups["pod"], NODE_IP, REDIRECT_PORT)
    assert direct.result["ok"], direct.result
    conn = accept(proxy_listener)
    assert conn is not None
    with conn:
        assert read_origin(conn) is None  # not captured: no record, the proxy must refuse it
        assert read_original_dst(conn) is None
    changes = delta(before, attached.counters())
    assert changes.get("loopback") == 1 and changes.get("to_redirect") == 1
    assert "captured" not in changes
    assert changes.get("origin_missing") == 2


def connect_from(topology, cgroup: Path, destination: tuple[str, int],
                 local: tuple[str, int] | None = None) -> socket.socket:
    """A socket created in the pod netns by a process in ``cgroup``, optionally bound, connected."""
    sock = socket_in(topology.ns_path(topology.pod_ns), cgroup)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if local is not None:
        sock.bind(local)
    sock.settimeout(3)
    sock.connect(destination)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): no TIME_WAIT on either side, the 4-tuple is free again."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def captured_then_reused(topology, cgroups, proxy_listener, reuse_cgroup: Path) -> socket.socket:
    """A captured connection (origin read, then reset), then a socket from ``reuse_cgroup`` bound to
    the same pod ip/port dialling the redirect address itself; returns the proxy's accepted socket."""
    with connect_from(topology, cgroups["pod"], REMOTE) as captured:
        local = captured.getsockname()
        conn = accept(proxy_listener)
        assert conn is not None
        origin = read_origin(conn)
        assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
        reset(conn)
    try:
        stranger = connect_from(topology, reuse_cgroup, (NODE_IP, REDIRECT_PORT), local=local)
    except OSError as exc:
        pytest.fail(f"could not reuse {local} after an RST: {exc}")
    conn = accept(proxy_listener)
    assert conn is not None
    assert conn.getpeername() == local  # the proxy sees the very same peer address
    stranger.close()
    return conn


def test_reused_client_address_outside_the_pod_cgroup_gets_no_origin(attached, topology, cgroups, proxy_listener):
    """The bug of issue #8: a record keyed by (pod ip, port) only, never removed, answered for a
    later uncaptured connection from that ip/port (a process in the pod's netns but outside its
    cgroup: no tcpmesh hook runs for it), which the proxy then tunnelled as the captured pod."""
    before = attached.counters()
    with captured_then_reused(topology, cgroups, proxy_listener, cgroups["other"]) as conn:
        assert read_origin(conn) is None
        assert read_original_dst(conn) is None
    changes = delta(before, attached.counters())
    assert changes.get("captured") == 1 and changes.get("rekeyed") == 1
    assert changes.get("origin_claimed") == 1  # the first connection's, answered to its own accepted socket
    assert changes.get("origin_answered") == 1 and changes.get("origin_missing") == 2


def test_reused_client_address_inside_the_pod_cgroup_gets_no_origin(attached, topology, cgroups, proxy_listener):
    """The same from the pod cgroup: a direct dial of the redirect address is not captured."""
    before = attached.counters()
    with captured_then_reused(topology, cgroups, proxy_listener, cgroups["pod"]) as conn:
        assert read_origin(conn) is None
    changes = delta(before, attached.counters())
    assert changes.get("to_redirect") == 1 and changes.get("origin_claimed") == 1
    assert changes.get("rekeyed") == 1  # only the captured connection published a record


def records(capture, name: str) -> int:
    pinned = capture.pinned()
    key = abi.MAPS[name][0]
    return len(pinned.libbpf.map_keys(pinned.map_fd(name), ctypes.sizeof(key), name))


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


SLOTS = "tcpmesh_sock_slots"
SLOT_COUNT = 65536  # TCPMESH_SOCK_SLOTS


def slot_owner(capture, cookie: int) -> int:
    pinned = capture.pinned()
    raw = pinned.libbpf.map_lookup(pinned.map_fd(SLOTS), bytes(ctypes.c_int(cookie % SLOT_COUNT)),
                                   ctypes.sizeof(abi.SockSlot), SLOTS)
    return abi.SockSlot.from_buffer_copy(raw).owner


def set_every_slot_owner(capture, owner: int) -> None:
    pinned = capture.pinned()
    value = bytes(abi.SockSlot(owner=owner))
    for index in range(SLOT_COUNT):
        pinned.libbpf.map_update(pinned.map_fd(SLOTS), bytes(ctypes.c_int(index)), value, SLOTS)


HANDOVER = "tcpmesh_handover_slots"
HANDOVER_COUNT = 16384  # TCPMESH_HANDOVER_SLOTS


def handover_states(capture) -> list[int]:
    pinned = capture.pinned()
    size = ctypes.sizeof(abi.HandoverSlot)
    return [abi.HandoverSlot.from_buffer_copy(
        pinned.libbpf.map_lookup(pinned.map_fd(HANDOVER), bytes(ctypes.c_int(i)), size, HANDOVER)).state
        for i in range(HANDOVER_COUNT)]


def set_every_handover_slot(capture, state: int, stamp: int) -> None:
    pinned = capture.pinned()
    value = bytes(abi.HandoverSlot(state=state, stamp=stamp))
    for index in range(HANDOVER_COUNT):
        pinned.libbpf.map_update(pinned.map_fd(HANDOVER), bytes(ctypes.c_int(index)), value, HANDOVER)


def one_captured_connection(topology, cgroups, proxy_listener) -> None:
    with connect_from(topology, cgroups["pod"], REMOTE) as client:
        assert client.getpeername() == REMOTE
        conn = accept(proxy_listener)
        assert conn is not None
        with conn:
            origin = read_origin(conn)
            assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
            assert read_origin(conn) is None  # once


@pytest.mark.slots_6_12
def test_a_busy_handover_slot_sends_the_record_to_the_lru(attached, topology, cgroups, proxy_listener):
    """Every hand-over slot READY for another connection, just now: the record goes to
    tcpmesh_peer_origin, answers once from there, and the busy slots stay as they were."""
    before, counters = records(attached, "tcpmesh_peer_origin"), attached.counters()
    set_every_handover_slot(attached, abi.HO_READY, time.monotonic_ns())
    try:
        one_captured_connection(topology, cgroups, proxy_listener)
        assert set(handover_states(attached)) == {abi.HO_READY}
    finally:
        set_every_handover_slot(attached, abi.HO_FREE, 0)
    assert records(attached, "tcpmesh_peer_origin") <= before
    changes = delta(counters, attached.counters())
    assert changes.get("handover_slot_taken") == 1 and changes.get("origin_claimed") == 1
    assert "handover_reclaimed" not in changes


@pytest.mark.slots_6_12
def test_a_handover_slot_nobody_answered_for_long_is_reused(attached, topology, cgroups, proxy_listener):
    """READY since boot (its proxy died with the connection queued): the next writer takes it over."""
    counters = attached.counters()
    set_every_handover_slot(attached, abi.HO_READY, 1)
    try:
        one_captured_connection(topology, cgroups, proxy_listener)
        assert handover_states(attached).count(abi.HO_READY) == HANDOVER_COUNT - 1  # ours answered: FREE
    finally:
        set_every_handover_slot(attached, abi.HO_FREE, 0)
    changes = delta(counters, attached.counters())
    assert changes.get("handover_reclaimed") == 1 and changes.get("origin_claimed") == 1
    assert "handover_slot_taken" not in changes


def test_records_do_not_outlive_their_connections(attached, topology, cgroups, proxy_listener):
    """Every captured connection's hand-over record is deleted with the proxy's one answer, and its
    per-socket record (its slot, or its LRU entry) is given up when the socket closes: nothing
    grows with short connections."""
    before, counters = {n: records(attached, n) for n in ("tcpmesh_peer_origin", "tcpmesh_cookie_origin")}, \
        attached.counters()
    cookies = []
    for _ in range(50):
        with connect_from(topology, cgroups["pod"], REMOTE):
            conn = accept(proxy_listener)
            assert conn is not None
            with conn:
                origin = read_origin(conn)
                assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
                cookies.append(origin.cookie)
                if USES_SLOTS:   # before 6.12 no slot is used: the record is in tcpmesh_cookie_origin
                    assert slot_owner(attached, origin.cookie) == origin.cookie  # the record is in its slot
    assert records(attached, "tcpmesh_peer_origin") <= before["tcpmesh_peer_origin"]
    assert set(handover_states(attached)) == {abi.HO_FREE}  # every hand-over given back with its answer
    # the client closed first: its socket reaches TCP_CLOSE when it enters TIME_WAIT
    assert wait_for(lambda: all(slot_owner(attached, c) == 0 for c in cookies)), \
        [c for c in cookies if slot_owner(attached, c)]
    assert records(attached, "tcpmesh_cookie_origin") <= before["tcpmesh_cookie_origin"]
    changes = delta(counters, attached.counters())
    assert changes.get("captured") == changes.get("origin_claimed") == changes.get("origin_answered") == 50
    assert changes.get("origin_closed") == 50 and "slot_taken" not in changes


@pytest.mark.slots_6_12
def test_a_socket_whose_slot_is_taken_keeps_its_record_in_the_lru(attached, topology, cgroups, proxy_listener):
    """Two live sockets whose cookies share a slot: the second one's record goes to
    tcpmesh_cookie_origin and serves the proxy, getpeername and the delete at close alike. (Every
    slot is made to look taken by a socket that is not there.)"""
    before, counters = records(attached, "tcpmesh_cookie_origin"), attached.counters()
    set_every_slot_owner(attached, 1)
    try:
        with connect_from(topology, cgroups["pod"], REMOTE) as client:
            assert records(attached, "tcpmesh_cookie_origin") == before + 1
            assert client.getpeername() == REMOTE
            conn = accept(proxy_listener)
            assert conn is not None
            with conn:
                origin = read_origin(conn)
                assert origin is not None and (origin.dst_ip, origin.dst_port) == REMOTE
                assert slot_owner(attached, origin.cookie) == 1  # untouched
        assert wait_for(lambda: records(attached, "tcpmesh_cookie_origin") <= before)
    finally:
        set_every_slot_owner(attached, 0)
    changes = delta(counters, attached.counters())
    assert changes.get("slot_taken") == 1 and changes.get("origin_closed") == 1
    assert changes.get("origin_answered") == 1


@pytest.mark.slots_6_12
def test_a_refused_handshake_leaves_no_record(attached, topology, cgroups, proxy_listener):
    """No proxy listening (an agent restarting): the captured connect is refused, and the socket's
    record goes with the failed handshake (SYN_SENT -> CLOSE), not at some later eviction."""
    proxy_listener.close()
    before, counters = records(attached, "tcpmesh_cookie_origin"), attached.counters()
    for _ in range(5):
        sock = socket_in(topology.ns_path(topology.pod_ns), cgroups["pod"])
        with sock:
            with pytest.raises(ConnectionRefusedError):
                sock.connect(REMOTE)
            cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)
            assert slot_owner(attached, cookie) == 0  # given back with the failed handshake
    assert records(attached, "tcpmesh_cookie_origin") <= before
    changes = delta(counters, attached.counters())
    assert changes.get("captured") == changes.get("origin_closed") == 5
    assert "rekeyed" not in changes


def test_the_original_peer_is_shown_for_the_whole_connection(attached, topology, cgroups, proxy_listener):
    """getpeername() reads the per-socket record, which lives until the socket closes: also after
    the proxy consumed the hand-over record and data went both ways."""
    with connect_from(topology, cgroups["pod"], REMOTE) as client:
        conn = accept(proxy_listener)
        assert conn is not None
        with conn:
            assert read_origin(conn) is not None
            conn.sendall(b"pong")
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping" and client.recv(4) == b"pong"
            assert client.getpeername() == REMOTE


def test_attach_is_idempotent_close_keeps_it_and_detach_removes_it(capture, bpffs_dir, cgroups, tmp_path):
    """close() (the agent's orderly stop) leaves everything attached: fail closed, not open."""
    cap = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path, bpffs_dir=bpffs_dir)
    cap.load()
    assert cap.adopted, "the module's pinned set has the same sources and flags: adopt it, compile nothing"
    cap.attach_pod(cgroups["pod"])
    cap.attach_pod(cgroups["pod"])
    cap.attach_proxy(cgroups["proxy"])
    shown = attached_table(cgroups["pod"])
    for name in ("tcpmesh_conn4", "tcpmesh_conn6", "tcpmesh_sockops", "tcpmesh_peer4", "tcpmesh_peer6"):
        assert shown.count(name) == 1, shown
    assert "tcpmesh_sockopt" in attached_table(cgroups["proxy"])
    assert cap.attachments() == {str(cgroups["pod"]): ("pod",), str(cgroups["proxy"]): ("proxy",)}
    cap.close()
    cap.close()  # idempotent
    assert attached_table(cgroups["pod"]).count("tcpmesh_conn4") == 1, "close() must not detach"
    assert "tcpmesh_sockopt" in attached_table(cgroups["proxy"])
    again = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path, bpffs_dir=bpffs_dir)
    again.load()
    try:
        again.attach_pod(cgroups["pod"])  # the same programs: EEXIST, nothing stacks
        assert attached_table(cgroups["pod"]).count("tcpmesh_conn4") == 1
        assert len(again.detach_pod(cgroups["pod"])) == len(hooks_for(ROLE_POD))
        assert len(again.detach_proxy(cgroups["proxy"])) == len(hooks_for(ROLE_PROXY))
        assert again.detach_pod(cgroups["pod"]) == []
    finally:
        again.close()
    for path in (cgroups["pod"], cgroups["proxy"]):
        assert attached_table(path).strip().splitlines()[1:] == []


def test_detach_leftovers_for_cleanup(capture, cgroups):
    from agent.capture.connect_mode import detach_leftovers

    capture.attach_pod(cgroups["pod"])
    removed = detach_leftovers(cgroups["pod"])
    assert sorted(r.split()[0] for r in removed) == sorted(h.program for h in hooks_for(ROLE_POD))
    assert "tcpmesh" not in attached_table(cgroups["pod"])
    assert detach_leftovers(cgroups["pod"]) == []
    capture.detach_pod(cgroups["pod"])


def test_removed_cgroup_counts_as_detached(capture, cgroups):
    capture.attach_pod(cgroups["pod"])
    cgroups["pod"].rmdir()
    assert capture.detach_pod(cgroups["pod"]) == []
    assert str(cgroups["pod"]) not in capture.attachments()


def test_root_cgroup_is_refused(cgroup2_mount, tmp_path):
    cap = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path)  # not loaded: nothing can attach
    with pytest.raises(ConfigError, match="root cgroup"):
        cap.attach_proxy(cgroup2_mount)
    with pytest.raises(ConfigError, match="root cgroup"):
        cap.attach_pod(cgroup2_mount)


def test_load_error_names_the_program_and_the_compiler_message(bpffs_dir, tmp_path):
    src = tmp_path / "bpf"
    shutil.copytree(Path(__file__).resolve().parents[2] / "bpf", src)
    (src / "capture_connect.c").write_text((src / "capture_connect.c").read_text()
                                           .replace("return TCPMESH_ALLOW;\n}\n", "return nonsense;\n}\n", 1))
    cap = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path / "state", source_dir=src,
                       bpffs_dir=bpffs_dir)
    with pytest.raises(BpfLoadError) as info:  # raised in the loader process, rebuilt in ours
        cap.load()
    assert info.value.stage == "compile"
    assert "nonsense" in str(info.value)
    assert not (bpffs_dir / cap.pin_names().set).exists()
