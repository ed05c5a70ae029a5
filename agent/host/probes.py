"""The kernel and host probes behind `tcpmesh doctor` (and so behind ``capture.mode: auto``).

Each probe is a small function returning a ``Probe`` (result, detail, exact error). Probes that
need a network namespace make their own throwaway one (``tcpmesh-probe-<pid>-<random>``) and
remove it; nothing is attached to the root cgroup or to any interface or netfilter table of the
caller's namespace. BPF programs are only loaded, never attached, except one trivial tc filter on
the throwaway namespace's loopback. Never imports bcc (the agent runs these probes for ``capture.mode:
auto``): ``probe_programs`` compiles and loads in the BPF loader's child process (agent.bpf.loader).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import importlib.util
import os
import platform
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

OK, FAIL, WARN, SKIPPED = "ok", "fail", "warn", "skipped"

# capability bits (uapi/linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "arm64": 280}
BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_SCHED_CLS = 3
ATTR_SIZE = 128
TIME_ERROR = 5
CLOCK_SANE_YEARS = (2024, 2100)
CLOCK_UNSYNCED = ("the kernel reports the clock as not synchronised (adjtimex TIME_ERROR). Why it matters: "
                  "every mTLS handshake checks certificates against it, and SVIDs live for an hour with 2 minutes "
                  "of back-dating — a clock more than 2 minutes off rejects peers' fresh certificates as not yet "
                  "valid (or its own look so to them), and the meshed connections fail (TLS_FAILURE); access-log "
                  "times drift too. "
                  "Fix: run a time daemon (`apt install systemd-timesyncd` or chrony), check with "
                  "`timedatectl` (System clock synchronized: yes)")

# check name -> (function in bpf/probe.c, BPF_PROG_TYPE_*, expected attach type or -1)
PROGRAM_PROBES: dict[str, tuple[str, int, int]] = {
    "prog_connect4": ("probe_connect4", 18, 10),        # cgroup_sock_addr / CGROUP_INET4_CONNECT
    "prog_connect6": ("probe_connect6", 18, 11),        # cgroup_sock_addr / CGROUP_INET6_CONNECT
    "prog_getpeername4": ("probe_peer4", 18, 29),       # cgroup_sock_addr / CGROUP_INET4_GETPEERNAME
    "prog_getpeername6": ("probe_peer6", 18, 30),       # cgroup_sock_addr / CGROUP_INET6_GETPEERNAME
    "prog_sockops": ("probe_sockops", 13, 3),           # sock_ops / CGROUP_SOCK_OPS
    "prog_getsockopt": ("probe_sockopt", 25, 21),       # cgroup_sockopt / CGROUP_GETSOCKOPT
    "prog_sched_cls": ("probe_sched_cls", 3, -1),       # sched_cls (tc)
    "helper_skc_lookup_tcp": ("probe_skc_lookup", 3, -1),
    "helper_sk_assign": ("probe_sk_assign", 3, -1),
}
# kernel TLS (uapi/linux/tls.h): the "tls" upper-layer protocol and its key options
IPV6_PROC = "/proc/sys/net/ipv6"
NO_IPV6 = "this kernel has no IPv6 (no /proc/sys/net/ipv6: ipv6.disable=1 or CONFIG_IPV6=n)"
TPROXY_PROBES = {"tproxy_nft": "nft", "tproxy_iptables_nft": "iptables-nft",
                 "tproxy_iptables_legacy": "iptables-legacy"}


@dataclass(frozen=True)
class Probe:
    result: str          # ok | fail | warn | skipped
    detail: str = ""     # what was found (version, path, ...)
    error: str = ""      # the exact error when not ok

    @property
    def usable(self) -> bool:
        return self.result in (OK, WARN)


def ok(detail: str = "") -> Probe:
    return Probe(OK, detail)


def fail(error: str, detail: str = "") -> Probe:
    return Probe(FAIL, detail, error)


def guarded(fn: Callable[[], Probe]) -> Probe:
    """Run one probe; an unexpected exception is that probe's failure, never the doctor's."""
    try:
        return fn()
    except Exception as exc:  # a probe's fault is its own row
        return fail(f"{type(exc).__name__}: {exc}")


# ---- host -------------------------------------------------------------------------------------------

def probe_root() -> Probe:
    euid = os.geteuid()
    return ok("euid 0") if euid == 0 else fail(f"running as euid {euid}: tcpmesh must run as root")


def effective_caps(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def probe_permissions(status_file: str = "/proc/self/status") -> Probe:
    caps = effective_caps(Path(status_file).read_text())
    missing = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not caps >> bit & 1]
    if missing:
        return fail(f"missing capabilities {', '.join(missing)} (CapEff {caps:#x})")
    bpf = "CAP_BPF" if caps >> CAP_BPF & 1 else "CAP_SYS_ADMIN for bpf()"
    return ok(f"CAP_NET_ADMIN, CAP_SYS_ADMIN, {bpf} (CapEff {caps:#x})")


def probe_clock(now: float | None = None) -> Probe:
    now = time.time() if now is None else now
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    low, high = CLOCK_SANE_YEARS
    if not low <= stamp.year < high:
        return fail(f"the wall clock says {stamp.isoformat(timespec='seconds')}: certificates would be rejected; "
                    "set the time (NTP) before starting the agent")
    detail = f"{stamp.isoformat(timespec='seconds')}, monotonic {time.monotonic():.0f}s"
    state = _adjtimex_state()
    if state == TIME_ERROR:
        return Probe(WARN, detail, CLOCK_UNSYNCED)
    return ok(detail)


def _adjtimex_state() -> int | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        return libc.adjtimex(buf)
    except (OSError, AttributeError):
        return None


def probe_ktls() -> Probe:
    """Kernel TLS for the tunnels (proxy.kernel_tls; CONFIG_TLS, Debian: the `tls` module, loaded on demand): the
    probe the agent runs at start (agent.proxy.kernel_tls_probe) — a TLS 1.3 pair on loopback with the tunnels' own
    contexts, both ends switched to kernel TLS by the agent's own switch, bytes both ways, close_notify. No capture
    mode needs it: informational (docs/kernels.md); it says which TLS the tunnels will run."""
    import asyncio

    from agent.proxy.kernel_tls_probe import probe

    problem, passed = asyncio.run(probe())
    if problem is not None:
        return fail(f"{problem}; the tunnels run user-space TLS (proxy.kernel_tls auto), and proxy.kernel_tls on "
                    "refuses to start. Optional: no capture mode needs it")
    return ok(f"kernel TLS: {passed}; the tunnels run on it (proxy.kernel_tls auto or on)")


# ---- bpf(2) without bcc ---------------------------------------------------------------------------

def _bpf(cmd: int, attr: ctypes.Array) -> int:
    nr = BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(0, f"no bpf syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(ATTR_SIZE))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def map_create_array() -> int:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(BPF_MAP_TYPE_ARRAY, 4, 4, 1), 16)
    return _bpf(BPF_MAP_CREATE, attr)


def prog_load_trivial(prog_type: int = BPF_PROG_TYPE_SCHED_CLS) -> int:
    """A 2-instruction program (r0 = -1; exit): for tc, TC_ACT_UNSPEC."""
    insns = (ctypes.c_uint8 * 16)(0xB7, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x95, 0, 0, 0, 0, 0, 0, 0)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    ctypes.memmove(ctypes.addressof(attr), (ctypes.c_uint32 * 2)(prog_type, 2), 8)
    ctypes.memmove(ctypes.addressof(attr) + 8, (ctypes.c_uint64 * 2)(ctypes.addressof(insns),
                                                                      ctypes.addressof(license_)), 16)
    ctypes.memmove(ctypes.addressof(attr) + 48, b"tcpmesh_probe\0", 14)
    return _bpf(BPF_PROG_LOAD, attr)


def probe_bpf_syscall() -> Probe:
    try:
        fd = map_create_array()
    except OSError as exc:
        return fail(f"bpf(BPF_MAP_CREATE) failed: [Errno {exc.errno}] {exc.strerror}")
    os.close(fd)
    return ok("bpf(BPF_MAP_CREATE) of a 1-entry array")


def probe_cgroup2(cgroup_root: str | None) -> Probe:
    from agent.host import checks

    cgroup2 = checks.host_cgroup2()
    problem = checks.cgroup2_problem(cgroup_root, cgroup2)
    return fail(problem) if problem else ok(f"cgroup v2 at {cgroup2.mount}")


def probe_bpffs(filesystems: str = "/proc/filesystems") -> Probe:
    names = [line.split()[-1] for line in Path(filesystems).read_text().splitlines() if line.strip()]
    if "bpf" not in names:
        return fail("the bpf filesystem type is not available (not in /proc/filesystems): the ebpf-connect "
                    "mode pins its programs in bpffs")
    return ok("bpf filesystem available")


# ---- bcc and program loads ------------------------------------------------------------------------

def probe_bcc() -> Probe:
    """bcc is installed where the BPF loader's child imports it: its Python package and libbcc.so.0.

    Found, not imported — ``import bcc`` maps libLLVM (~74 MB) into the process that asks, and the
    agent asks this for ``capture.mode: auto``. ``probe_programs`` then imports it for real, in the child.
    """
    from agent.install_form import bcc_link_command

    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return fail("no Python package bcc for this interpreter: install python3-bpfcc and link it into the venv "
                    f"({bcc_link_command()})")
    if ctypes.util.find_library("bcc") is None:
        return fail("libbcc.so.0 is not installed (python3-bpfcc needs it): install libbpfcc")
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", _read(Path(spec.origin).with_name("version.py")))
    return ok(f"bcc {found.group(1) if found else '?'} at {Path(spec.origin).parent}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def probe_programs(state_dir: str | None, wanted: set[str]) -> dict[str, Probe]:
    """Compile bpf/probe.c once (check ``bpf_compile``) and load each wanted program, in the BPF
    loader's child process (agent.bpf.loader, ``probe=True``: a refused program is a row, not an error)."""
    from agent.bpf import sources
    from agent.bpf.loader import LoadRequest, Program, load

    out: dict[str, Probe] = {}
    chosen = {check: spec for check, spec in PROGRAM_PROBES.items() if check in wanted}
    source_dir = sources.bpf_dir()
    with _state_dir(state_dir) as where:
        request = LoadRequest(str(source_dir / "probe.c"), tuple(sources.base_cflags(source_dir)), where,
                              tuple(Program(*spec) for spec in chosen.values()), probe=True)
        try:
            loaded = load(request)
        except Exception as exc:
            out["bpf_compile"] = fail(_first_lines(str(exc)))
            return out
        with loaded:  # the probe programs' fds: closed, never attached
            out["bpf_compile"] = ok(f"bpf/probe.c with the kernel stub in {loaded.compile_seconds:.2f}s")
            for check, (function, prog_type, attach_type) in chosen.items():
                if function in loaded.failed:
                    out[check] = fail(_first_lines(loaded.failed[function], 6))
                else:
                    out[check] = ok(f"loaded {function} (type {prog_type}, attach type {attach_type})")
    return out


@contextlib.contextmanager
def _state_dir(state_dir: str | None) -> Iterator[str]:
    if state_dir:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        yield state_dir
        return
    with tempfile.TemporaryDirectory(prefix="tcpmesh-doctor-") as tmp:
        yield tmp


def _first_lines(text: str, lines: int = 4) -> str:
    rows = [row for row in text.strip().splitlines() if row.strip()]
    return " | ".join(rows[:1] + rows[-(lines - 1):] if len(rows) > lines else rows)


# ---- throwaway network namespace ------------------------------------------------------------------

PROBE_NETNS_PREFIX = "tcpmesh-probe-"
_PROBE_NETNS = re.compile(rf"^{PROBE_NETNS_PREFIX}(\d+)-[0-9a-f]+$")


def stale_probe_namespaces(names: list[str], pid_alive: Callable[[int], bool]) -> list[str]:
    """The throwaway namespaces in ``names`` whose creating process is gone (a doctor killed mid-probe
    never ran its ``finally``). A name whose pid is alive is kept: it may be another doctor's."""
    stale = []
    for name in names:
        match = _PROBE_NETNS.match(name)
        if match and not pid_alive(int(match.group(1))):
            stale.append(name)
    return stale


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def remove_stale_probe_namespaces() -> list[str]:
    """Remove leftovers of killed doctor runs; returns the names removed."""
    from pyroute2 import netns

    removed = []
    for name in stale_probe_namespaces(netns.listnetns(), pid_alive):
        with contextlib.suppress(OSError):
            netns.remove(name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    from pyroute2 import netns

    remove_stale_probe_namespaces()
    name = f"{PROBE_NETNS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def probe_tc_clsact(netns: str) -> Probe:
    """clsact on the throwaway namespace's lo, a trivial direct-action bpf filter, then removed."""
    from agent.capture.netns import ipr

    fd = prog_load_trivial()
    try:
        with ipr(netns) as handle:
            lo = handle.link_lookup(ifname="lo")[0]
            handle.tc("add", "clsact", lo)
            try:
                handle.tc("add-filter", "bpf", lo, 1, fd=fd, name="tcpmesh_probe", parent=0xFFFFFFF2, prio=1,
                          protocol=0x0800, direct_action=True)
                names = [f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")
                         for f in handle.get_filters(index=lo, parent=0xFFFFFFF2) if f.get_attr("TCA_OPTIONS")]
            finally:
                handle.tc("del", "clsact", lo)
    finally:
        os.close(fd)
    if "tcpmesh_probe" not in names:
        return fail(f"the filter did not show up on ingress (found {names})")
    return ok("clsact qdisc + direct-action bpf filter on ingress")


def probe_policy_routing(netns: str) -> Probe:
    from agent.capture import steering

    steering.ensure(netns)
    found = steering.present(netns)
    steering.remove(netns)
    if len(found) != 2:
        return fail(f"after installing, found {found}")
    return ok(f"fwmark {steering.MARK:#x} rule + local table {steering.TABLE}")


def probe_policy_routing6(netns: str, ipv6_proc: str = IPV6_PROC) -> Probe:
    """The IPv6 pair of the source return path (agent.capture.steering, family AF_INET6): in the
    throwaway netns, after checking this (the node's) namespace's lo — which a fresh one cannot show."""
    from agent.capture import steering

    if not os.path.isdir(ipv6_proc):
        return Probe(SKIPPED, error=NO_IPV6)
    lo = Path(ipv6_proc) / "conf" / "lo" / "disable_ipv6"
    if lo.is_file() and lo.read_text().strip() != "0":
        return fail("IPv6 is disabled on this node's lo (net.ipv6.conf.lo.disable_ipv6=1): the local ::/0 route "
                    "of the IPv6 return path cannot go there; set it to 0")
    try:
        steering.ensure(netns, socket.AF_INET6)
        found = [item for item in steering.present(netns) if item.startswith("ip -6 ")]
    finally:
        steering.remove(netns)
    if len(found) != 2:
        return fail(f"after installing, found {found}")
    return ok(f"ip -6 fwmark {steering.MARK:#x} rule + local ::/0 table {steering.TABLE}")


def probe_tproxy(netns: str, backend_name: str) -> Probe:
    from agent.capture import abi
    from agent.capture.netfilter import NetfilterError, backend, spec_for

    chosen = backend(backend_name, netns)
    try:
        chosen.install(spec_for("0.0.0.0", 15001, abi.STEER_MARK, ["0.0.0.0/0"]))
        chosen.add_interface("tmprobe0")
    except NetfilterError as exc:
        return fail(str(exc))
    finally:
        try:
            chosen.remove()
        except NetfilterError:
            pass  # the namespace goes away anyway
    return ok(f"TPROXY rules installed and removed with {backend_name}")
