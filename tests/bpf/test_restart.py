"""Restarts: a new agent adopts the pinned set, or swaps in a new one with no gap.

A pod in pods/a connects over and over (LoopClient) while a second ConnectCapture — what a
restarted agent builds — takes over. Every attempt must be captured: reach the proxy listener
(which records the origin it reads for each accepted connection: exactly one per attempt), never
fail, never get EPERM (after a change of map layout, a connection captured by one set and accepted
under the other's getsockopt has no origin and is refused by the proxy: fail closed, counted here,
and only during the swap) — and never reach the destination itself: REMOTE exists on the node, with a
listener (PlaintextSink) that an uncaptured connect would reach in plaintext. For the swaps, each
attach and detach of the new set is slowed down (SlowSwap), so the window between the first and the
last is long enough that many attempts fall inside it: the test asserts they do.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from agent.capture.connect_mode import ROLE_GUARD, ROLE_POD, ROLE_PROXY, hooks_for

from agent.capture import ConnectCapture
from agent.capture.connect_mode import HOOKS
from tests.bpf.bpfworld import NODE_IP, REDIRECT_PORT, Acceptor, LoopClient, OriginAcceptor, mesh_capture
from tests.bpf.test_connect_capture import REMOTE, attached_table
from tests.conftest import TIME_SCALE

POD_HOOKS = tuple(h.program for h in hooks_for(ROLE_POD))
SWAP_STEP_SECONDS = 0.02  # SlowSwap: after each attach/detach of the new set
MIN_ATTEMPTS_IN_WINDOW = 20
LATE_ACCEPT_SLACK = 0.1  # the acceptor thread may accept a connection this long after it was made


class PlaintextSink(Acceptor):
    """REMOTE on the node's loopback with a listener: an uncaptured connect from the pod reaches it
    directly, in plaintext. Counts what it accepts."""

    def __init__(self, topology) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=topology.node_ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=REMOTE[0], prefixlen=32)
        self.accepted = 0
        super().__init__(topology.ns_path(topology.node_ns), None, REMOTE)

    def handle(self, conn: socket.socket) -> None:
        self.accepted += 1

    def close(self) -> int:
        self.stop()
        return self.accepted


class SlowSwap:
    """Wraps a Libbpf: sleeps after every attach/detach, stretching a takeover over many connects."""

    def __init__(self, libbpf) -> None:
        self._libbpf = libbpf

    def __getattr__(self, name):
        return getattr(self._libbpf, name)

    def prog_attach(self, *args):
        try:
            return self._libbpf.prog_attach(*args)
        finally:
            time.sleep(SWAP_STEP_SECONDS)

    def prog_detach(self, *args):
        try:
            return self._libbpf.prog_detach(*args)
        finally:
            time.sleep(SWAP_STEP_SECONDS)


@pytest.fixture
def running(capture, topology, cgroups):
    """The 'old agent': the module's set on pods/a, the guard on pods/, getsockopt on proxy/."""
    capture.set_capture_cidrs(["10.77.0.0/16"])
    capture.takeover(cgroups["pods"], cgroups["proxy"])
    capture.attach_pod(cgroups["pod_a"])
    acceptor = OriginAcceptor(topology.ns_path(topology.node_ns), cgroups["proxy"])
    sink = PlaintextSink(topology)
    try:
        yield capture, acceptor
    finally:
        acceptor.close()
        assert sink.close() == 0, "a connect reached the destination itself, uncaptured, in plaintext"


def attached_ids(libbpf, path: Path) -> dict[str, list[int]]:
    import os

    from agent.capture.connect_mode import HOOKS

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out: dict[str, list[int]] = {}
        for attach_type in sorted({h.attach_type for h in HOOKS}):
            for prog_id in libbpf.prog_query(fd, attach_type, str(path)):
                prog_fd = libbpf.prog_fd_by_id(prog_id)
                try:
                    out.setdefault(libbpf.prog_info(prog_fd)[1], []).append(prog_id)
                finally:
                    os.close(prog_fd)
        return out
    finally:
        os.close(fd)


class Recorder:
    """Wraps a Libbpf: logs every attach/detach as (op, cgroup path, attach type, program id)."""

    def __init__(self, libbpf) -> None:
        self._libbpf = libbpf
        self.ops: list[tuple[str, str, int, int]] = []

    def __getattr__(self, name):
        return getattr(self._libbpf, name)

    def _log(self, op, prog_fd, cgroup_fd, attach_type):
        import os

        path = os.readlink(f"/proc/self/fd/{cgroup_fd}")
        self.ops.append((op, path, attach_type, self._libbpf.prog_info(prog_fd)[0]))

    def prog_attach(self, prog_fd, cgroup_fd, attach_type, flags, target):
        done = self._libbpf.prog_attach(prog_fd, cgroup_fd, attach_type, flags, target)
        if done:
            self._log("attach", prog_fd, cgroup_fd, attach_type)
        return done

    def prog_detach(self, prog_fd, cgroup_fd, attach_type, target):
        self._log("detach", prog_fd, cgroup_fd, attach_type)
        return self._libbpf.prog_detach(prog_fd, cgroup_fd, attach_type, target)


def assert_never_uncovered(ops, start: dict[tuple[str, int], set[int]], pod_a: str, pods: str,
                           set_of: dict[int, str]) -> None:
    """Replay ``ops`` from ``start``: every hook of pod_a always has a program, and every guard on
    pods/ always has its own set's connect4 on pod_a (a guard honours only its own set's tokens)."""
    from agent.capture.connect_mode import ATTACH_INET4_CONNECT, HOOKS, ROLE_POD

    state = {key: set(ids) for key, ids in start.items()}
    pod_types = {h.attach_type for h in HOOKS if h.role == ROLE_POD}
    for op in ops:
        kind, path, attach_type, prog_id = op
        ids = state.setdefault((path, attach_type), set())
        ids.add(prog_id) if kind == "attach" else ids.discard(prog_id)
        for attach in pod_types:
            assert state.get((pod_a, attach)), f"pod hook {attach} uncovered after {op}"
        pod_sets = {set_of[i] for i in state.get((pod_a, ATTACH_INET4_CONNECT), ())}
        guard_sets = {set_of[i] for t in (10, 11) for i in state.get((pods, t), ())}
        assert guard_sets and guard_sets <= pod_sets, f"after {op}: guards of {guard_sets}, pod has {pod_sets}"


def swap_under_load(topology, cgroups, acceptor, new: ConnectCapture) -> tuple[list, list, float, float]:
    loop = LoopClient(topology.ns_path(topology.pod_ns), cgroups["pod_a"], *REMOTE, pause=0.0)
    time.sleep(0.3)
    started = time.time()
    replaced = new.takeover(cgroups["pods"], cgroups["proxy"])
    ended = time.time()
    time.sleep(0.3)
    attempts = loop.stop()
    return attempts, replaced, started, ended


def assert_each_captured(attempts: list, acceptor: OriginAcceptor, refusals_until: float | None = None) -> int:
    """No attempt failed, and the proxy listener got exactly one connection per attempt, with its origin.
    With ``refusals_until`` (a map-layout swap), a connection may instead have no origin — the proxy
    refuses it: fail closed — but only one that started before then. Returns how many had none."""
    failures = [a for a in attempts if a[1]]
    assert attempts and not failures, failures
    deadline = time.monotonic() + 10
    while len(acceptor.origins) < len(attempts) and time.monotonic() < deadline:
        time.sleep(0.05)
    origins = acceptor.close()
    assert len(origins) == len(attempts), (len(attempts), len(origins))
    wrong = [(i, o) for i, o in enumerate(origins) if o != REMOTE]
    if refusals_until is None:
        assert not wrong, (len(wrong), wrong[:3], wrong[-3:])
        return 0
    assert all(o is None for _, o in wrong), wrong[:3]
    late = [(i, attempts[i][0] - refusals_until) for i, _ in wrong if attempts[i][0] > refusals_until]
    assert not late, f"connects after the swap lost their origin: {late[:5]}"
    return len(wrong)


def assert_window_used(attempts: list, started: float, ended: float) -> None:
    inside = [a for a in attempts if started <= a[0] <= ended]
    assert len(inside) >= MIN_ATTEMPTS_IN_WINDOW, \
        f"only {len(inside)} connects during the {ended - started:.3f} s swap: the swap was not tested under load"


def test_restart_with_the_same_sources_adopts_the_pinned_set(running, bpffs_dir, cgroups, topology, tmp_path):
    old, acceptor = running
    again = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path, bpffs_dir=bpffs_dir)
    again.load()
    try:
        assert again.adopted and again.loader_result is None
        assert again.load_seconds < 0.5 * TIME_SCALE, again.load_seconds
        assert again.pinned().prog_ids == old.pinned().prog_ids
        attempts, replaced, _, _ = swap_under_load(topology, cgroups, acceptor, again)
        assert replaced == []
        assert again.attachments()[str(cgroups["pod_a"])] == ("pod",)
        for name in POD_HOOKS:
            assert attached_table(cgroups["pod_a"]).count(name) == 1
    finally:
        again.close()
    assert_each_captured(attempts, acceptor)


def test_new_program_code_swaps_in_with_no_gap_and_shares_the_maps(running, bpffs_dir, cgroups, topology, tmp_path):
    """An upgrade that changes only program code: the new set reuses the pinned maps, so even a
    connection captured by the old programs and accepted after the swap finds its origin."""
    old, acceptor = running
    src = tmp_path / "bpf"
    shutil.copytree(Path(__file__).resolve().parents[2] / "bpf", src)
    main = src / "capture_connect.c"
    main.write_text(main.read_text() + "\n/* a new version of the programs */\n")
    new = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path / "state", source_dir=src,
                       bpffs_dir=bpffs_dir)
    new.load()
    try:
        assert not new.adopted and new.loader_result.compiled
        assert new.pin_names().maps == old.pin_names().maps and new.pin_names().set != old.pin_names().set
        counted = new.counters()["captured"]
        assert counted == old.counters()["captured"] > 0, "the counters map is shared: counts survive"
        new._libbpf = SlowSwap(new.libbpf)
        attempts, replaced, started, ended = swap_under_load(topology, cgroups, acceptor, new)
        assert_window_used(attempts, started, ended)
        assert len(replaced) == len(POD_HOOKS) + len(hooks_for(ROLE_GUARD)) + len(hooks_for(ROLE_PROXY)), replaced
        ids = attached_ids(new.libbpf, cgroups["pod_a"])
        for name in POD_HOOKS:
            assert ids[name] == [new.pinned().prog_ids[name]], ids
        guard = attached_ids(new.libbpf, cgroups["pods"])
        assert guard == {n: [new.pinned().prog_ids[n]] for n in ("tcpmesh_guard4", "tcpmesh_guard6")}
        pruned = new.prune_pins()
        assert any(old.pin_names().set in p for p in pruned)
        assert not any(old.pin_names().maps in p for p in pruned), "shared maps must stay pinned"
    finally:
        new.detach_all()
        new.close()
    assert_each_captured(attempts, acceptor)


def test_new_maps_swap_keeps_every_pod_captured_and_guarded(running, bpffs_dir, cgroups, topology, tmp_path):
    """A change of map layout (here: their size) gets new maps; the two-phase swap still leaves no
    moment where the pod is uncaptured or refused by a guard that does not know its new token."""
    old, acceptor = running
    new = mesh_capture(NODE_IP, REDIRECT_PORT, ["10.77.0.0/16"], tmp_path, bpffs_dir=bpffs_dir,
                       max_connections=4096)
    new.load()
    try:
        assert new.pin_names().maps != old.pin_names().maps
        start = {}
        for path in (cgroups["pod_a"], cgroups["pods"]):
            for name, ids in attached_ids(new.libbpf, path).items():
                hook = next(h for h in HOOKS if h.program == name)
                start.setdefault((str(path), hook.attach_type), set()).update(ids)
        recorder = Recorder(SlowSwap(new.libbpf))
        new._libbpf = recorder
        attempts, replaced, started, ended = swap_under_load(topology, cgroups, acceptor, new)
        assert_window_used(attempts, started, ended)
        set_of = {**{i: "old" for i in old.pinned().prog_ids.values()},
                  **{i: "new" for i in new.pinned().prog_ids.values()}}
        assert_never_uncovered(recorder.ops, start, str(cgroups["pod_a"]), str(cgroups["pods"]), set_of)
        assert len(replaced) == len(POD_HOOKS) + len(hooks_for(ROLE_GUARD)) + len(hooks_for(ROLE_PROXY))
        assert new.counters()["guard_denied"] == 0
        pruned = new.prune_pins()
        assert any(old.pin_names().maps in p for p in pruned)
        assert sorted(p.name for p in bpffs_dir.iterdir()) == sorted([new.pin_names().maps, new.pin_names().set])
    finally:
        new.detach_all()
        new.close()
    # captured by one set, accepted under the other set's getsockopt: no origin, refused by the proxy
    # (docs/capture-restart.md); never a failed connect, never plaintext (the sink), none after the swap
    refused = assert_each_captured(attempts, acceptor, refusals_until=ended + LATE_ACCEPT_SLACK)
    print(f"map-layout swap: {refused} of {len(attempts)} connects lost their origin "
          f"({ended - started:.3f} s swap, slowed)")
