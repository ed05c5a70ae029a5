"""The ebpf-connect capture mode: compile bpf/capture_connect.c with bcc, load it, attach it to cgroups.

``ConnectCapture`` owns one compiled program set and everything it attached:
  - ``attach_pod(dir)``: connect4/6 + sockops + getpeername4/6 on a workload's cgroup;
  - ``attach_proxy(dir)``: getsockopt on the cgroup the proxy's sockets live in;
  - ``close()``: detaches exactly what this object attached.
Attachment is legacy BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI (the call bcc's ``attach_func`` makes,
issued through libbpf to keep the errno): others' programs on the same cgroup stay, and ours stay
attached if the agent crashes, so captured connections then fail closed (nothing listens on the
redirect port) instead of leaking in plaintext. Programs named ``tcpmesh_*`` that a previous run
left on a cgroup are detached before ours go on, so a restart never stacks two program sets.

Imports bcc only inside ``load()``; the pure parts (cflags, CIDR entries, counter sums) are in
functions that need no root. Must not import the proxy, plumbing or telemetry packages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from agent.capture import abi, kstub
from agent.capture.cgroups import CgroupTarget, Libbpf, cgroup_target, read_mounts
from agent.capture.cidrs import DEFAULT_CAPTURE_CIDRS, lpm_entries
from agent.capture.counters import sum_per_cpu
from agent.capture.errors import AttachError, BccMissing, BpfLoadError, NotLoaded
from agent.errors import ConfigError

SOURCE_NAME = "capture_connect.c"
PROG_NAME_PREFIX = "tcpmesh_"
BPF_F_ALLOW_MULTI = 2
DEFAULT_MAX_CONNECTIONS = 65536

# BPF_PROG_TYPE_* / BPF_ATTACH_TYPE_* (uapi/linux/bpf.h; bcc's BPFProgType/BPFAttachType agree).
PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCKOPT = 25
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_SOCK_OPS = 3
ATTACH_GETSOCKOPT = 21
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30

ROLE_POD = "pod"
ROLE_PROXY = "proxy"


@dataclass(frozen=True)
class Hook:
    program: str        # C function name (<= 15 chars: the kernel's program name)
    prog_type: int
    attach_type: int
    role: str


# Attach order: the connect hooks last on a pod, so a connection is only ever captured once the
# programs that complete its record (sockops) and hide the redirect (getpeername) are in place.
# connect6/getpeername6 cover dual-stack AF_INET6 sockets dialling v4-mapped addresses (JVM, Go):
# without them such connects would bypass capture in plaintext.
HOOKS: tuple[Hook, ...] = (
    Hook("tcpmesh_sockops", PROG_SOCK_OPS, ATTACH_SOCK_OPS, ROLE_POD),
    Hook("tcpmesh_peer4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_GETPEERNAME, ROLE_POD),
    Hook("tcpmesh_peer6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_GETPEERNAME, ROLE_POD),
    Hook("tcpmesh_conn6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, ROLE_POD),
    Hook("tcpmesh_conn4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, ROLE_POD),
    Hook("tcpmesh_sockopt", PROG_CGROUP_SOCKOPT, ATTACH_GETSOCKOPT, ROLE_PROXY),
)


def hooks_for(role: str) -> tuple[Hook, ...]:
    return tuple(h for h in HOOKS if h.role == role)


def bpf_dir() -> Path:
    """bpf/ in the source tree this package lives in."""
    return Path(__file__).resolve().parents[2] / "bpf"


def compile_flags(source_dir: Path, redirect_ip: str, redirect_port: int,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS) -> list[str]:
    """The -I/-D flags for capture_connect.c (pure). REDIR_IP is the host-order integer."""
    return [
        f"-I{source_dir}",
        f"-I{source_dir / 'include'}",
        f"-DREDIR_IP={int(ipaddress.IPv4Address(redirect_ip))}u",
        f"-DREDIR_PORT={int(redirect_port)}",
        f"-DTCPMESH_MAX_CONNS={int(max_connections)}",
    ]


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
    """One loaded copy of capture_connect.c and the cgroups it is attached to."""

    def __init__(self, redirect_ip: str, redirect_port: int,
                 capture_cidrs: Sequence[str] = DEFAULT_CAPTURE_CIDRS, state_dir: str | os.PathLike = "/run/tcpmesh",
                 *, bypass_cidrs: Sequence[str] = (), source_dir: str | os.PathLike | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        validate_redirect(redirect_ip, redirect_port)
        self.redirect_ip = redirect_ip
        self.redirect_port = int(redirect_port)
        self._cidr_entries = lpm_entries(capture_cidrs, bypass_cidrs)  # validates now, not at load()
        self.state_dir = Path(state_dir)
        self.source_dir = Path(source_dir) if source_dir else bpf_dir()
        self.max_connections = max_connections
        self._bpf = None
        self._fns: dict[str, object] = {}
        self._libbpf: Libbpf | None = None
        self._own_ids: set[int] = set()
        self._attached: dict[tuple[str, str], CgroupTarget] = {}  # (path, role) -> target
        self.load_seconds: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Compile and load every program; fill the capture CIDRs. Raises BpfLoadError/BccMissing."""
        if self._bpf is not None:
            return
        try:
            from bcc import BPF
        except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
            raise BccMissing(f"bcc not importable ({exc}): install Debian's python3-bpfcc and link it into "
                             "the venv; run `make setup`") from exc
        started = time.monotonic()
        source = self.source_dir / SOURCE_NAME
        if not source.is_file():
            raise BpfLoadError("compile", str(source), "", "source file not found: the tcpmesh tree is incomplete")
        tree = kstub.materialise(self.state_dir / "bcc-kstub")
        cflags = compile_flags(self.source_dir, self.redirect_ip, self.redirect_port, self.max_connections)
        with kstub.kernel_source(tree), _captured_stderr() as log:
            try:
                bpf = BPF(src_file=str(source).encode(), cflags=cflags)
            except Exception as exc:
                raise BpfLoadError("compile", str(source), "", str(exc), log.read()) from exc
        try:
            for hook in HOOKS:
                with _captured_stderr() as log:
                    try:
                        self._fns[hook.program] = bpf.load_func(hook.program.encode(), hook.prog_type,
                                                                attach_type=hook.attach_type)
                    except Exception as exc:
                        raise BpfLoadError("load", str(source), hook.program, str(exc), log.read()) from exc
            self._libbpf = Libbpf()
            self._own_ids = {self._libbpf.prog_info(fn.fd)[0] for fn in self._fns.values()}
            self._bpf = bpf
            self._write_cidrs(self._cidr_entries)
        except BaseException:
            self._fns.clear()
            self._bpf = None
            bpf.cleanup()
            raise
        self.load_seconds = time.monotonic() - started

    def close(self) -> None:
        """Detach everything this object attached, then release the programs and maps."""
        errors: list[Exception] = []
        for path, role in list(self._attached):
            try:
                self._detach(path, role)
            except AttachError as exc:
                errors.append(exc)
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
            self._fns.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> ConnectCapture:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- attachment ----------------------------------------------------------------------------

    def attach_pod(self, cgroup_dir: str | os.PathLike) -> None:
        """connect4/6 + sockops + getpeername4/6 on a workload's cgroup. Idempotent."""
        self._attach(cgroup_dir, ROLE_POD)

    def detach_pod(self, cgroup_dir: str | os.PathLike) -> None:
        """Undo attach_pod. Idempotent; a cgroup that is already gone counts as detached."""
        self._detach(os.path.realpath(cgroup_dir), ROLE_POD)

    def attach_proxy(self, cgroup_dir: str | os.PathLike) -> None:
        """The getsockopt hook on the cgroup the proxy's sockets live in (never the root cgroup)."""
        self._attach(cgroup_dir, ROLE_PROXY)

    def detach_proxy(self, cgroup_dir: str | os.PathLike) -> None:
        self._detach(os.path.realpath(cgroup_dir), ROLE_PROXY)

    def attachments(self) -> dict[str, tuple[str, ...]]:
        """{cgroup path: roles attached there}, a snapshot for `doctor` and tests."""
        out: dict[str, tuple[str, ...]] = {}
        for path, role in sorted(self._attached):
            out[path] = out.get(path, ()) + (role,)
        return out

    def _attach(self, cgroup_dir: str | os.PathLike, role: str) -> None:
        target = cgroup_target(cgroup_dir, role, read_mounts())  # refuses the root cgroup first
        self._require_loaded()
        if (target.path, role) in self._attached:
            return
        done: list[Hook] = []
        with _open_dir(target.path, role) as fd:
            try:
                for hook in hooks_for(role):
                    self._detach_stale(fd, hook, target.path)
                    self._libbpf.prog_attach(self._fns[hook.program].fd, fd, hook.attach_type,
                                             BPF_F_ALLOW_MULTI, f"{hook.program} on {target.path}")
                    done.append(hook)
            except BaseException:
                for hook in reversed(done):  # leave the cgroup as we found it
                    self._libbpf.prog_detach(self._fns[hook.program].fd, fd, hook.attach_type, target.path)
                raise
        self._attached[(target.path, role)] = target

    def _detach(self, path: str, role: str) -> None:
        if (path, role) not in self._attached:
            return
        if self._bpf is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                fd = None  # cgroup removed: the kernel released its programs with it
            if fd is not None:
                try:
                    for hook in reversed(hooks_for(role)):
                        self._libbpf.prog_detach(self._fns[hook.program].fd, fd, hook.attach_type,
                                                 f"{hook.program} on {path}")
                finally:
                    os.close(fd)
        del self._attached[(path, role)]

    def _detach_stale(self, cgroup_fd: int, hook: Hook, path: str) -> None:
        """Detach tcpmesh programs of this hook that are not ours (left by a crashed run)."""
        _detach_named(self._libbpf, cgroup_fd, hook, path, keep_ids=self._own_ids)

    # ---- maps ----------------------------------------------------------------------------------

    def set_capture_cidrs(self, capture_cidrs: Sequence[str], bypass_cidrs: Sequence[str] = ()) -> None:
        """Replace the capture CIDRs: new entries go in before stale ones come out."""
        entries = lpm_entries(capture_cidrs, bypass_cidrs)
        self._cidr_entries = entries
        if self._bpf is not None:
            self._write_cidrs(entries)

    def counters(self) -> dict[str, int]:
        """{reason: total over CPUs}; empty when any reason could not be read (partial read)."""
        self._require_loaded()
        table = self._bpf[b"tcpmesh_counters"]
        per_reason: dict[int, list[int] | None] = {}
        for code in range(abi.REASON_MAX):
            try:
                per_reason[code] = list(table.getvalue(table.Key(code)))
            except (KeyError, OSError):
                per_reason[code] = None
        return sum_per_cpu(per_reason) or {}

    def table(self, name: str):
        """A bcc table by name (tests and `doctor`)."""
        self._require_loaded()
        return self._bpf[name.encode()]

    def _write_cidrs(self, entries: dict[tuple[int, int], int]) -> None:
        table = self._bpf[b"tcpmesh_capture_cidrs"]
        for (prefixlen, ip4), action in entries.items():
            key = table.Key.from_buffer_copy(bytes(abi.CidrKey(prefixlen=prefixlen, ip4=ip4)))
            table[key] = table.Leaf.from_buffer_copy(bytes(abi.CidrValue(action=action)))
        for key in list(table.keys()):
            if (key.prefixlen, key.ip4) not in entries:
                del table[key]

    def _require_loaded(self) -> None:
        if self._bpf is None:
            raise NotLoaded("ConnectCapture.load() has not run (or close() already did)")


def detach_leftovers(cgroup_dir: str | os.PathLike) -> list[str]:
    """Detach every tcpmesh capture program attached directly to ``cgroup_dir`` (by name).

    For `tcpmesh cleanup` after a crash: needs root and libbpf, not bcc. Returns what it detached,
    as "name on path". Programs of other tools on the cgroup are left alone.
    """
    path = os.path.realpath(cgroup_dir)
    libbpf = Libbpf()
    removed: list[str] = []
    with _open_dir(path, "leftover") as fd:
        for hook in HOOKS:
            removed += _detach_named(libbpf, fd, hook, path, keep_ids=frozenset())
    return removed


def _detach_named(libbpf: Libbpf, cgroup_fd: int, hook: Hook, path: str, keep_ids: Iterable[int]) -> list[str]:
    removed = []
    for prog_id in libbpf.prog_query(cgroup_fd, hook.attach_type, path):
        if prog_id in keep_ids:
            continue
        prog_fd = libbpf.prog_fd_by_id(prog_id)
        if prog_fd is None:
            continue
        try:
            _, name = libbpf.prog_info(prog_fd)
            if name == hook.program and libbpf.prog_detach(prog_fd, cgroup_fd, hook.attach_type,
                                                           f"leftover {name} on {path}"):
                removed.append(f"{name} on {path}")
        finally:
            os.close(prog_fd)
    return removed


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


class _Log:
    def __init__(self, file) -> None:
        self._file = file

    def read(self) -> str:
        self._file.flush()
        self._file.seek(0)
        return self._file.read().decode(errors="replace")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Log]:
    """Capture fd 2 (where libbcc prints clang errors and the verifier log) for the block.

    Process-wide while it lasts; used only around compile/load, before the agent serves traffic.
    Whatever was captured is replayed to the real stderr afterwards, so nothing is hidden.
    """
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield _Log(tmp)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                os.write(2, data)

