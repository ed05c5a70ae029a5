"""`tcpmesh cleanup`: remove everything tcpmesh made on this node, in any capture mode.

  1. every BPF program whose name starts with ``tcpmesh`` attached to a cgroup in
     ``capture.cgroup_scope`` (default: the whole ``capture.cgroup_root``), any cgroup attach type;
  2. the pins under ``capture.bpffs_dir`` (default /sys/fs/bpf/tcpmesh/<node name>);
  3. what the ebpf-tc and iptables modes left in this network namespace (their
     ``cleanup_leftovers``; skipped with a note when that mode is not installed).
Programs are detached before they are unpinned, so the kernel frees them at once. Other tools'
programs are left alone. Running it twice is fine: the second run finds nothing. Stop the agent
first: a running agent's pods would be left uncaptured. Needs root and libbpf, never bcc.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.bpf import pins
from agent.bpf.errors import AttachError
from agent.bpf.libbpf import Libbpf
from agent.capture.cgroups import walk
from agent.config import Config

PROGRAM_PREFIX = "tcpmesh"
# Every cgroup attach type (uapi/linux/bpf.h enum bpf_attach_type) a program can be attached to
# with BPF_PROG_ATTACH; ones this kernel does not know answer EINVAL and are skipped.
CGROUP_ATTACH_TYPES: dict[int, str] = {
    0: "ingress", 1: "egress", 2: "sock_create", 3: "sock_ops", 6: "device", 8: "bind4", 9: "bind6",
    10: "connect4", 11: "connect6", 12: "post_bind4", 13: "post_bind6", 14: "sendmsg4", 15: "sendmsg6",
    18: "sysctl", 19: "recvmsg4", 20: "recvmsg6", 21: "getsockopt", 22: "setsockopt",
    29: "getpeername4", 30: "getpeername6", 31: "getsockname4", 32: "getsockname6", 34: "sock_release",
}
OTHER_MODES = ("agent.capture.tc_mode", "agent.capture.tproxy_mode")


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_cleanup(config: Config, dry_run: bool = False) -> CleanupReport:
    report = CleanupReport()
    scope = config.capture.cgroup_scope or config.capture.cgroup_root
    detach_cgroup_programs(scope, report, dry_run)
    bpffs_dir = config.capture.bpffs_dir or pins.default_bpffs_dir(config.node.name)
    remove_pins(bpffs_dir, report, dry_run)
    for module in OTHER_MODES:
        other_mode_leftovers(module, report, dry_run)
    probe_namespace_leftovers(report, dry_run)
    return report


def probe_namespace_leftovers(report: CleanupReport, dry_run: bool = False) -> None:
    """Throwaway namespaces of a doctor run that was killed mid-probe (its pid is gone)."""
    from pyroute2 import netns

    from agent.host.probes import pid_alive, remove_stale_probe_namespaces, stale_probe_namespaces

    if dry_run:
        report.removed += [f"would remove netns {name}" for name in stale_probe_namespaces(netns.listnetns(), pid_alive)]
        return
    report.removed += [f"removed netns {name}" for name in remove_stale_probe_namespaces()]


def detach_cgroup_programs(scope: str, report: CleanupReport, dry_run: bool = False) -> None:
    """Detach every ``tcpmesh*`` program attached directly to a cgroup at or below ``scope``."""
    if not os.path.isdir(scope):
        report.notes.append(f"cgroup scope {scope} does not exist: no cgroup programs to look for")
        return
    libbpf = Libbpf()
    verb = "would detach" if dry_run else "detached"
    for path in walk(scope):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # removed meanwhile: its programs went with it
        try:
            for attach_type, type_name in CGROUP_ATTACH_TYPES.items():
                for prog_id, name, prog_fd in _attached(libbpf, fd, attach_type, path):
                    try:
                        if not name.startswith(PROGRAM_PREFIX):
                            continue
                        if dry_run or libbpf.prog_detach(prog_fd, fd, attach_type, f"{name} on {path}"):
                            report.removed.append(f"{verb} {name} (id {prog_id}, {type_name}) from cgroup {path}")
                    except AttachError as exc:
                        report.problems.append(str(exc))
                    finally:
                        os.close(prog_fd)
        finally:
            os.close(fd)


def _attached(libbpf: Libbpf, cgroup_fd: int, attach_type: int, path: str):
    try:
        ids = libbpf.prog_query(cgroup_fd, attach_type, path)
    except AttachError:
        return  # attach type unknown to this kernel (EINVAL), or the cgroup vanished
    for prog_id in ids:
        prog_fd = libbpf.prog_fd_by_id(prog_id)
        if prog_fd is None:
            continue
        try:
            _, name = libbpf.prog_info(prog_fd)
        except AttachError:
            os.close(prog_fd)
            continue
        yield prog_id, name, prog_fd


def remove_pins(bpffs_dir: str, report: CleanupReport, dry_run: bool = False,
                default_root: str = pins.DEFAULT_ROOT) -> None:
    """Unpin everything under ``bpffs_dir``; drop the default root too when that leaves it empty.

    Under systemd the default root is the unit's ReadWritePaths= mount inside a read-only /sys/fs/bpf:
    its rmdir fails (EROFS or EBUSY, ``pins.MOUNT_POINT_ERRNOS``) and the empty directory stays — a note,
    not a problem (the unit's next ExecStartPre finds it). Any other failure is a problem, never a crash
    that would skip the steps after this one."""
    path = Path(bpffs_dir)
    verb = "would unpin" if dry_run else "unpinned"
    try:
        for item in pins.remove_tree(path, dry_run):
            report.removed.append(f"{verb} {item}")
    except OSError as exc:
        report.problems.append(f"cannot remove the pins under {path}: {exc}; remove them by hand (rm -r {path})")
        return
    root = Path(default_root)
    if dry_run or path.parent != root or not root.is_dir() or pins.entries(root):
        return
    try:
        root.rmdir()
    except OSError as exc:
        if exc.errno in pins.MOUNT_POINT_ERRNOS:
            report.notes.append(f"kept the empty {root}/ ({os.strerror(exc.errno)}: under systemd it is the unit's "
                                f"ReadWritePaths= mount; harmless)")
        else:
            report.problems.append(f"cannot remove the empty {root}/: {exc}")
        return
    report.removed.append(f"{verb} {root}/")


def other_mode_leftovers(module_name: str, report: CleanupReport, dry_run: bool = False) -> None:
    """Call ``<mode>.cleanup_leftovers(netns=None)`` (this netns); a mode not installed is a note."""
    try:
        module = importlib.import_module(module_name)
        cleanup = getattr(module, "cleanup_leftovers")
    except (ImportError, AttributeError) as exc:
        report.notes.append(f"{module_name} is not available ({exc}); nothing of that mode to remove")
        return
    kwargs = {"netns": None}
    if dry_run:
        if "dry_run" not in inspect.signature(cleanup).parameters:
            report.notes.append(f"dry run: {module_name} leftovers not inspected (it has no dry-run)")
            return
        kwargs["dry_run"] = True
    try:
        removed = cleanup(**kwargs)
    except Exception as exc:  # another mode's failure must not hide what this run removed
        report.problems.append(f"{module_name}.cleanup_leftovers failed: {exc}")
        return
    report.removed += [f"{'would remove' if dry_run else 'removed'} {item}" for item in removed]
