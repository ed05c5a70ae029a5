"""The ebpf-connect capture mode: a pinned program set attached to cgroups, driven without bcc.

``ConnectCapture`` is the agent's handle on one program set of bpf/capture_connect.c:
  - ``load()``: adopt the set pinned under ``bpffs_dir`` whose name matches this source tree and
    these flags (agent.bpf.pins), or have the loader process compile and pin it first
    (agent.bpf.loader); then open the pins (agent.capture.pinned) and fill the settings
    (passthrough DENY), the capture CIDRs and the destinations in the mesh (the only ones captured;
    ``set_mesh_destinations`` replaces them from each registry snapshot);
  - ``takeover(pods_cgroup, proxy_cgroup)``: every cgroup that carries a tcpmesh set (a previous
    run's, perhaps of another version) gets ours with no gap: ours are attached everywhere first,
    then the others detached, the guard's first;
  - ``attach_pod``/``attach_guard``/``attach_proxy``: ours on, then any other tcpmesh program of
    the same hooks off; ``detach_*`` remove every tcpmesh program of that role from the cgroup;
  - ``close()``: releases our file descriptors and leaves attachments and pins in place, so the
    pods stay captured while no agent runs: their connects go to the redirect port, where nothing
    listens, and are refused (fail closed). ``detach_all()`` undoes this object's attachments.
Attachment is legacy BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI: others' programs on a cgroup stay,
and ours outlive the agent. Imports no bcc (the loader process does). Must not import the proxy,
plumbing or telemetry packages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from agent.bpf import attach, pins, sources
from agent.bpf.errors import AttachError, NotLoaded
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import DEFAULT_TIMEOUT, Loaded, LoadRequest, PinTo, Program
from agent.bpf.pinned import adopt_or_pin
from agent.capture import abi
from agent.capture.cgroups import cgroup_target, read_mounts, walk
from agent.capture.cidrs import DEFAULT_CAPTURE_CIDRS, lpm_entries
from agent.capture.meshdsts import CAPTURE_EVERYTHING, MeshDestination, mesh_entries
from agent.capture.pinned import ConnectSet
from agent.errors import ConfigError, EnvironmentProblem


SOURCE_NAME = "capture_connect.c"
MAP_SOURCES = ("include/tcpmesh_abi.h", "lib/maps.h")  # what defines the maps: their pin directory's hash
PROG_NAME_PREFIX = "tcpmesh_"
BPF_F_ALLOW_MULTI = 2
DEFAULT_MAX_CONNECTIONS = 65536
DEFAULT_BPFFS_DIR = f"{pins.DEFAULT_ROOT}/default"

# BPF_PROG_TYPE_* / BPF_ATTACH_TYPE_* (uapi/linux/bpf.h; bcc's BPFProgType/BPFAttachType agree).
PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCKOPT = 25
PROG_CGROUP_SKB = 8
ATTACH_INET_INGRESS = 0
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_SOCK_OPS = 3
ATTACH_GETSOCKOPT = 21
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30

ROLE_POD = "pod"
ROLE_PROXY = "proxy"
ROLE_GUARD = "guard"


@dataclass(frozen=True)
class Hook:
    program: str        # C function name (<= 15 chars: the kernel's program name)
    prog_type: int
    attach_type: int
    role: str


# Attach order: the connect hooks last on a pod, so a connection is only ever captured once the
# programs that complete its record (sockops) and hide the redirect (getpeername) are in place.
# connect6/getpeername6 cover dual-stack AF_INET6 sockets dialling v4-mapped addresses (JVM, Go):
# without them such connects would bypass capture in plaintext. The guard goes on the cgroup that
# holds every pod (capture.pods_cgroup) and refuses TCP connects no pod hook handled.
HOOKS: tuple[Hook, ...] = (
    Hook("tcpmesh_inb4", PROG_CGROUP_SKB, ATTACH_INET_INGRESS, ROLE_POD),
    Hook("tcpmesh_inb6", PROG_CGROUP_SKB, ATTACH_INET_INGRESS, ROLE_POD),
    Hook("tcpmesh_sockops", PROG_SOCK_OPS, ATTACH_SOCK_OPS, ROLE_POD),
    Hook("tcpmesh_peer4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_GETPEERNAME, ROLE_POD),
    Hook("tcpmesh_peer6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_GETPEERNAME, ROLE_POD),
    Hook("tcpmesh_conn6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, ROLE_POD),
    Hook("tcpmesh_conn4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, ROLE_POD),
    Hook("tcpmesh_sockopt", PROG_CGROUP_SOCKOPT, ATTACH_GETSOCKOPT, ROLE_PROXY),
    Hook("tcpmesh_pxops", PROG_SOCK_OPS, ATTACH_SOCK_OPS, ROLE_PROXY),
    Hook("tcpmesh_guard6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, ROLE_GUARD),
    Hook("tcpmesh_guard4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, ROLE_GUARD),
)
PROGRAMS: tuple[str, ...] = tuple(h.program for h in HOOKS)


def hooks_for(role: str) -> tuple[Hook, ...]:
    return tuple(h for h in HOOKS if h.role == role)


def bpf_dir() -> Path:
    """bpf/, as shipped with this package (agent/bpf/sources.py)."""
    return sources.bpf_dir()


# bpf_setsockopt(SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) from a connect hook: Linux 6.12 and later.
CONNECT_CB_FLAGS_SINCE = (6, 12)


def connect_sets_cb_flags(kernel_release: str) -> bool:
    """Can connect4/6 turn on the sockops state callback themselves on this kernel (pure)?

    ``kernel_release`` is ``uname -r``. Unparsable or older: False, and the programs take the
    pre-6.12 path (sockops turns the callback on at ESTABLISHED; docs/capture-connect.md).
    """
    found = re.match(r"(\d+)\.(\d+)", kernel_release)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= CONNECT_CB_FLAGS_SINCE


def program_flags(redirect_ip: str, redirect_port: int, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  kernel_release: str | None = None, guard_netns_cookie: int | None = None,
                  admin_endpoint: tuple[str, int] | None = None) -> list[str]:
    """The -D flags that change the programs (pure given ``kernel_release``, default ``uname -r``).
    REDIR_IP is the host-order integer. ``guard_netns_cookie``: the node guard lets TCP connects
    from sockets of this network namespace through (``own_netns_cookie``; the DaemonSet's).
    ``admin_endpoint``: the agent's admin address and port, which a pod's connect is refused
    (``admin_port_flags``)."""
    flags = [
        f"-DREDIR_IP={int(ipaddress.IPv4Address(redirect_ip))}u",
        f"-DREDIR_PORT={int(redirect_port)}",
        f"-DTCPMESH_MAX_CONNS={int(max_connections)}",
    ]
    if connect_sets_cb_flags(os.uname().release if kernel_release is None else kernel_release):
        flags.append("-DTCPMESH_CONNECT_CB_FLAGS=1")
    if guard_netns_cookie is not None:
        flags.append(f"-DTCPMESH_GUARD_NETNS_COOKIE={int(guard_netns_cookie)}ull")
    if admin_endpoint is not None:
        flags += admin_port_flags(*admin_endpoint)
    return flags


def admin_port_flags(address: str, port: int) -> list[str]:
    """The -D flags that make a pod's connect to the admin port fail with EPERM (pure): none for a
    loopback or IPv6 address (a pod's 127.0.0.1 is its own netns; IPv6 admin is not refused in the
    kernel), ADMIN_IP 0 for 0.0.0.0 (every address of the node: the admin port anywhere)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return []
    if not isinstance(ip, ipaddress.IPv4Address) or ip.is_loopback or not 0 < int(port) < 65536:
        return []
    return [f"-DTCPMESH_ADMIN_IP={int(ip)}u", f"-DTCPMESH_ADMIN_PORT={int(port)}"]


SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux 5.14


def own_netns_cookie() -> int:
    """The cookie of the network namespace this process runs in (what bpf_get_netns_cookie returns
    for its sockets). Raises EnvironmentProblem where the kernel cannot say (before Linux 5.14)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError as exc:
            raise EnvironmentProblem(
                f"this kernel cannot tell the agent its network namespace cookie (SO_NETNS_COOKIE: {exc.strerror}; "
                "Linux 5.14 or later): capture.guard_exempt_host_network needs it — use a newer kernel, or turn "
                "it off and run the agent outside capture.pods_cgroup") from exc


def compile_flags(source_dir: Path, redirect_ip: str, redirect_port: int,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS, maps_dir: str | os.PathLike | None = None,
                  guard_netns_cookie: int | None = None, admin_endpoint: tuple[str, int] | None = None) -> list[str]:
    """Every flag of the compile (pure): include paths, program flags, and where the maps are pinned."""
    flags = [*sources.base_cflags(source_dir),
             *program_flags(redirect_ip, redirect_port, max_connections, guard_netns_cookie=guard_netns_cookie,
                            admin_endpoint=admin_endpoint)]
    if maps_dir is not None:
        flags.append(f'-DTCPMESH_MAPS_DIR="{maps_dir}"')
    return flags


def validate_redirect(redirect_ip: str, redirect_port: int) -> None:
    try:
        addr = ipaddress.IPv4Address(redirect_ip)
    except ValueError as exc:
        raise ConfigError("capture.redirect_address", redirect_ip, "must be an IPv4 address",
                          "use an address of this node that every pod can reach, e.g. the pods' gateway") from exc
    if addr.is_unspecified:
        raise ConfigError("capture.redirect_address", redirect_ip, "cannot be 0.0.0.0",
                          "use an address of this node that every pod can reach")
    if not 1 <= int(redirect_port) <= 65535:
        raise ConfigError("proxy.outbound_port", redirect_port, "must be a TCP port between 1 and 65535")


class ConnectCapture:
    """The agent's handle on one pinned program set of capture_connect.c and the cgroups it attached."""

    def __init__(self, redirect_ip: str, redirect_port: int,
                 capture_cidrs: Sequence[str] = DEFAULT_CAPTURE_CIDRS, state_dir: str | os.PathLike = "/run/tcpmesh",
                 *, bypass_cidrs: Sequence[str] = (), source_dir: str | os.PathLike | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, bpffs_dir: str | os.PathLike = DEFAULT_BPFFS_DIR,
                 loader_timeout: float = DEFAULT_TIMEOUT, mesh_destinations: Sequence[MeshDestination] | None = (),
                 passthrough_deny: bool = False, ipv6: bool = True, guard_netns_cookie: int | None = None,
                 admin_endpoint: tuple[str, int] | None = None) -> None:
        validate_redirect(redirect_ip, redirect_port)
        self.guard_netns_cookie = guard_netns_cookie
        self.admin_endpoint = admin_endpoint
        self.redirect_ip = redirect_ip
        self.redirect_port = int(redirect_port)
        self._cidr_entries = lpm_entries(capture_cidrs, bypass_cidrs)  # validates now, not at load()
        # None: keep the pinned map's entries; if it has none (new maps), capture everything until
        # set_mesh_destinations() names the mesh — never a moment where a mesh destination is missing
        self._mesh_entries = None if mesh_destinations is None else mesh_entries(mesh_destinations)
        self._settings = (abi.SETTING_PASSTHROUGH_DENY if passthrough_deny else 0) | \
            (0 if ipv6 else abi.SETTING_IPV6_OFF)
        self.state_dir = Path(state_dir)
        self.source_dir = Path(source_dir) if source_dir else bpf_dir()
        self.max_connections = max_connections
        self.bpffs_dir = Path(os.path.abspath(bpffs_dir))
        self.loader_timeout = loader_timeout
        self._set: ConnectSet | None = None
        self._libbpf: Libbpf | None = None
        self._attached: set[tuple[str, str]] = set()  # (path, role)
        self.names: pins.SetNames | None = None
        self.adopted: bool | None = None          # True: a pinned set was reused, nothing compiled
        self.loader_result: Loaded | None = None
        self.load_seconds: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def pin_names(self) -> pins.SetNames:
        """The set and maps directory names for this source tree and these flags."""
        return pins.set_names(self.source_dir, SOURCE_NAME, abi.ABI_VERSION, self.max_connections,
                              program_flags(self.redirect_ip, self.redirect_port, self.max_connections,
                                            guard_netns_cookie=self.guard_netns_cookie,
                                            admin_endpoint=self.admin_endpoint), PROGRAMS,
                              map_sources=MAP_SOURCES)

    @property
    def set_dir(self) -> Path:
        return self.bpffs_dir / self.pin_names().set

    def load(self) -> None:
        """Adopt the matching pinned set or load one via the loader process; open it; fill the CIDRs."""
        if self._set is not None:
            return
        started = time.monotonic()
        pins.ensure_bpffs(str(self.bpffs_dir))
        names = self.pin_names()
        set_dir, maps_dir = self.bpffs_dir / names.set, self.bpffs_dir / names.maps
        request = LoadRequest(
            source=str(self.source_dir / SOURCE_NAME),
            cflags=tuple(compile_flags(self.source_dir, self.redirect_ip, self.redirect_port, self.max_connections,
                                       maps_dir, self.guard_netns_cookie, self.admin_endpoint)),
            state_dir=str(self.state_dir), programs=tuple(Program(h.program, h.prog_type, h.attach_type) for h in HOOKS),
            pin_to=PinTo(str(self.bpffs_dir), names.set, names.maps))
        self.loader_result = adopt_or_pin(request, abi.PINNED_MAPS, self.loader_timeout)
        adopted = self.loader_result is None
        libbpf = self._libbpf or Libbpf()
        pinned = ConnectSet.open_connect(libbpf, set_dir, maps_dir, PROGRAMS)
        try:  # before anything is attached: the first connect already meets the configured decision
            pinned.write_settings(self._settings)
            pinned.write_cidrs(self._cidr_entries)
            if self._mesh_entries is not None:
                pinned.write_mesh_dsts(self._mesh_entries)
            elif not pinned.mesh_dsts():
                pinned.write_mesh_dsts(mesh_entries(CAPTURE_EVERYTHING))
        except BaseException:
            pinned.close()
            raise
        self._libbpf, self._set, self.names, self.adopted = libbpf, pinned, names, adopted
        self.load_seconds = time.monotonic() - started

    def close(self) -> None:
        """Release our fds; every attachment and pin stays (capture keeps failing closed). Idempotent."""
        if self._set is not None:
            self._set.close()
            self._set = None
        self._attached.clear()

    def detach_all(self) -> list[str]:
        """Detach every tcpmesh program from the cgroups this object attached (guard first)."""
        removed: list[str] = []
        order = {ROLE_GUARD: 0, ROLE_POD: 1, ROLE_PROXY: 2}
        for path, role in sorted(self._attached, key=lambda pr: (order[pr[1]], pr[0])):
            removed += self._detach(path, role)
        return removed

    def prune_pins(self) -> list[str]:
        """Unpin every other program set and maps directory under bpffs_dir (call after takeover)."""
        self._require_loaded()
        assert self.names is not None
        return pins.prune(self.bpffs_dir, {self.names.set, self.names.maps},
                          (pins.SET_PREFIX, pins.MAPS_PREFIX, pins.STAGING_PREFIX))

    def __enter__(self) -> ConnectCapture:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- attachment ----------------------------------------------------------------------------

    def takeover(self, pods_cgroup: str | os.PathLike | None = None,
                 proxy_cgroup: str | os.PathLike | None = None) -> list[str]:
        """Put our set wherever a tcpmesh set is attached, with no gap; returns what was replaced.

        Phase 1 attaches ours next to the old programs: on every cgroup below ``pods_cgroup`` that
        carries tcpmesh pod programs, then the guard on ``pods_cgroup``, then the getsockopt hook on
        ``proxy_cgroup``. Phase 2 detaches the others, the old guard before the old pod programs: a
        guard only honours the tokens of its own set, so an old guard must never outlive them.
        """
        self._require_loaded()
        pods = os.path.realpath(pods_cgroup) if pods_cgroup else None
        proxy = os.path.realpath(proxy_cgroup) if proxy_cgroup else None
        plan: list[tuple[str, str]] = []
        if pods is not None:
            plan += [(path, ROLE_POD) for path in walk(pods) if path != pods and self._carries(path, ROLE_POD)]
            plan.append((pods, ROLE_GUARD))
        if proxy is not None:
            plan.append((proxy, ROLE_PROXY))
        for path, role in plan:
            self._attach(path, role, replace=False)
        order = {ROLE_GUARD: 0, ROLE_POD: 1, ROLE_PROXY: 2}
        replaced: list[str] = []
        for path, role in sorted(plan, key=lambda pr: order[pr[1]]):
            replaced += self._detach_others(path, role)
        return replaced

    def guarded_cgroups(self, scope: str | os.PathLike) -> list[str]:
        """Cgroups at or below ``scope`` that carry a tcpmesh guard (any set's, ours or a previous run's)."""
        return [path for path in walk(os.path.realpath(scope)) if self._carries(path, ROLE_GUARD)]

    def attach_pod(self, cgroup_dir: str | os.PathLike) -> None:
        """connect4/6 + sockops + getpeername4/6 on a workload's cgroup. Idempotent."""
        self._attach(cgroup_dir, ROLE_POD)

    def detach_pod(self, cgroup_dir: str | os.PathLike) -> list[str]:
        """Remove every tcpmesh pod program from the cgroup. Idempotent; a removed cgroup counts as detached."""
        return self._detach(os.path.realpath(cgroup_dir), ROLE_POD)

    def attach_guard(self, pods_cgroup: str | os.PathLike) -> None:
        """The node guard on the cgroup that holds every pod (never the agent's own ancestor)."""
        self._attach(pods_cgroup, ROLE_GUARD)

    def detach_guard(self, pods_cgroup: str | os.PathLike) -> list[str]:
        return self._detach(os.path.realpath(pods_cgroup), ROLE_GUARD)

    def attach_proxy(self, cgroup_dir: str | os.PathLike) -> None:
        """The getsockopt hook on the cgroup the proxy's sockets live in (never the root cgroup)."""
        self._attach(cgroup_dir, ROLE_PROXY)

    def detach_proxy(self, cgroup_dir: str | os.PathLike) -> list[str]:
        return self._detach(os.path.realpath(cgroup_dir), ROLE_PROXY)

    def attachments(self) -> dict[str, tuple[str, ...]]:
        """{cgroup path: roles attached there}, a snapshot for `doctor` and tests."""
        out: dict[str, tuple[str, ...]] = {}
        for path, role in sorted(self._attached):
            out[path] = out.get(path, ()) + (role,)
        return out

    def _attach(self, cgroup_dir: str | os.PathLike, role: str, replace: bool = True) -> None:
        target = cgroup_target(cgroup_dir, role, read_mounts())  # refuses the root cgroup first
        self._require_loaded()
        assert self._set is not None and self._libbpf is not None
        if (target.path, role) in self._attached:
            return
        added: list[Hook] = []
        with _open_dir(target.path, role) as fd:
            try:
                for hook in hooks_for(role):  # ours first ...
                    if self._libbpf.prog_attach(self._set.prog_fd(hook.program), fd, hook.attach_type,
                                                BPF_F_ALLOW_MULTI, f"{hook.program} on {target.path}"):
                        added.append(hook)
            except BaseException:
                for hook in reversed(added):  # leave the cgroup as we found it
                    with contextlib.suppress(AttachError):
                        self._libbpf.prog_detach(self._set.prog_fd(hook.program), fd, hook.attach_type, target.path)
                raise
            if replace:  # ... then the others of the same hooks off: never a moment without capture
                for hook in hooks_for(role):
                    _detach_named(self._libbpf, fd, hook, target.path, keep_ids=self._set.own_ids)
        self._attached.add((target.path, role))

    def _detach(self, path: str, role: str) -> list[str]:
        removed: list[str] = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            fd = None  # cgroup removed: the kernel released its programs with it
        if fd is not None:
            try:
                for hook in reversed(hooks_for(role)):
                    removed += _detach_named(self.libbpf, fd, hook, path, keep_ids=frozenset())
            finally:
                os.close(fd)
        self._attached.discard((path, role))
        return removed

    def _detach_others(self, path: str, role: str) -> list[str]:
        assert self._set is not None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return []
        try:
            return [r for hook in hooks_for(role)
                    for r in _detach_named(self.libbpf, fd, hook, path, keep_ids=self._set.own_ids)]
        finally:
            os.close(fd)

    def _carries(self, path: str, role: str) -> bool:
        """Does ``path`` have any tcpmesh program of ``role`` attached directly?"""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return False
        try:
            return any(_named(self.libbpf, fd, hook, path) for hook in hooks_for(role))
        finally:
            os.close(fd)

    @property
    def libbpf(self) -> Libbpf:
        if self._libbpf is None:
            self._libbpf = Libbpf()
        return self._libbpf

    # ---- maps ----------------------------------------------------------------------------------

    def set_capture_cidrs(self, capture_cidrs: Sequence[str], bypass_cidrs: Sequence[str] = ()) -> None:
        """Replace the capture CIDRs: new entries go in before stale ones come out."""
        entries = lpm_entries(capture_cidrs, bypass_cidrs)
        self._cidr_entries = entries
        if self._set is not None:
            self._set.write_cidrs(entries)

    def set_mesh_destinations(self, destinations: Sequence[MeshDestination]) -> None:
        """Replace the destinations in the mesh (the only ones captured): new in before stale out."""
        entries = mesh_entries(destinations)
        self._mesh_entries = entries
        if self._set is not None:
            self._set.write_mesh_dsts(entries)

    def set_passthrough_deny(self, deny: bool) -> None:
        """policy.outbound_passthrough: DENY refuses TCP connects outside the mesh at connect()."""
        self._settings = (self._settings & ~abi.SETTING_PASSTHROUGH_DENY) | (abi.SETTING_PASSTHROUGH_DENY if deny else 0)
        if self._set is not None:
            self._set.write_settings(self._settings)

    def set_ipv6(self, enabled: bool) -> None:
        """capture.ipv6: false refuses (EPERM) every TCP connect to an IPv6 destination in the mesh."""
        self._settings = (self._settings & ~abi.SETTING_IPV6_OFF) | (0 if enabled else abi.SETTING_IPV6_OFF)
        if self._set is not None:
            self._set.write_settings(self._settings)

    def egress_reader(self, on_event):
        """An agent.capture.egress.EgressReader of this set's tcpmesh_egress ring buffer (close it)."""
        from agent.capture.egress import open_reader

        self._require_loaded()
        assert self._set is not None
        return open_reader(self._set.map_fd("tcpmesh_egress"), on_event)

    def set_inbound_mode(self, cgroup_dir: str | os.PathLike, strict: bool) -> None:
        """STRICT: the pod's kernel drops TCP SYNs that do not come from the inbound proxy."""
        self._require_loaded()
        assert self._set is not None
        self._set.set_inbound_mode(os.stat(cgroup_dir).st_ino,
                                   abi.INBOUND_STRICT if strict else abi.INBOUND_PERMISSIVE)

    def forget_pod(self, cgroup_id: int) -> None:
        self._require_loaded()
        assert self._set is not None
        self._set.forget_pod(cgroup_id)

    def plaintext(self) -> dict[int, tuple[int, int]]:
        """{pod cgroup id: (plaintext SYNs rejected, accepted)}."""
        self._require_loaded()
        assert self._set is not None
        return self._set.plaintext()

    def counters(self) -> dict[str, int]:
        """{reason: total over CPUs}; empty when any reason could not be read (partial read)."""
        self._require_loaded()
        assert self._set is not None
        return self._set.counters()

    def pinned(self) -> ConnectSet:
        """The open pinned set (tests and `doctor`: map fds, program ids)."""
        self._require_loaded()
        assert self._set is not None
        return self._set

    def _require_loaded(self) -> None:
        if self._set is None:
            raise NotLoaded("ConnectCapture.load() has not run (or close() already did)")


def detach_leftovers(cgroup_dir: str | os.PathLike) -> list[str]:
    """Detach every tcpmesh capture program attached directly to ``cgroup_dir`` (by name).

    Needs root and libbpf, not bcc. Returns what it detached, as "name on path". Programs of other
    tools on the cgroup are left alone. (`tcpmesh cleanup` goes wider: agent.host.cleanup.)
    """
    path = os.path.realpath(cgroup_dir)
    libbpf = Libbpf()
    removed: list[str] = []
    with _open_dir(path, "leftover") as fd:
        for hook in HOOKS:
            removed += _detach_named(libbpf, fd, hook, path, keep_ids=frozenset())
    return removed


def _named(libbpf: Libbpf, cgroup_fd: int, hook: Hook, path: str) -> list[int]:
    """Ids of the programs named ``hook.program`` attached to the cgroup for ``hook.attach_type``."""
    return attach.named(libbpf, cgroup_fd, hook.attach_type, hook.program, path)


def _detach_named(libbpf: Libbpf, cgroup_fd: int, hook: Hook, path: str, keep_ids: Iterable[int]) -> list[str]:
    return attach.detach_named(libbpf, cgroup_fd, hook.attach_type, hook.program, path, keep_ids)


@contextlib.contextmanager
def _open_dir(path: str, role: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise AttachError("open", f"{role} cgroup {path}", exc.errno) from exc
    try:
        yield fd
    finally:
        os.close(fd)
