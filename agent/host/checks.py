"""Probes of the host that decide whether tcpmesh can run, each returning a reason an operator can act on.

Used by the agent at start (clear errors instead of tracebacks) and by the test suite to decide
skips. Reads /proc and /sys; changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.errors import EnvironmentProblem
from agent.install_form import bcc_link_command
from agent.mounts import CGROUP_ROOT_AUTO, Cgroup2, find_cgroup2_mount, host_cgroup2  # the lab, doctor, tests ask


def own_cgroup_path(cgroup_root: str, proc_file: str = "/proc/self/cgroup") -> str:
    """This process's cgroup v2 directory, read from the ``0::`` line of /proc/self/cgroup."""
    for line in Path(proc_file).read_text().splitlines():
        if line.startswith("0::"):
            return os.path.join(cgroup_root, line[3:].lstrip("/")).rstrip("/") or cgroup_root
    raise EnvironmentProblem(f"{proc_file} has no cgroup v2 entry: is cgroup v2 mounted at {cgroup_root}?")


def root_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root: tcpmesh loads BPF programs and creates namespaces; run it as root (sudo)"
    return None


def cgroup2_problem(cgroup_root: str | None = None, cgroup2: Cgroup2 | None = None) -> str | None:
    """None if cgroup v2 is mounted, writable and is ``cgroup_root`` (when given); else what is wrong and the fix
    that fits this host's layout (agent.mounts: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified beside
    cgroup v1's hierarchies)."""
    cgroup2 = cgroup2 or host_cgroup2()
    mount = cgroup2.mount
    if mount is None:
        return f"cgroup v2 is not mounted: {cgroup2.fix}"
    if cgroup_root and cgroup_root != CGROUP_ROOT_AUTO and os.path.realpath(cgroup_root) != os.path.realpath(mount):
        return (f"cgroup v2 is mounted at {mount}, not at {cgroup_root}: set capture.cgroup_root to {mount}, or to "
                "auto (the default: the host's mount)")
    if not os.access(mount, os.W_OK):
        return f"cgroup v2 at {mount} is not writable: run as root with a writable cgroup v2 mount"
    return None


def bcc_problem() -> str | None:
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        return (f"bcc is not importable ({exc}): install Debian's python3-bpfcc and link it into the venv; "
                f"{bcc_link_command()}")
    return None


def netns_problem() -> str | None:
    if root_problem():
        return root_problem()
    if not os.path.exists("/proc/self/ns/net"):
        return "network namespaces are not supported by this kernel"
    return None


def require(*problems: str | None) -> None:
    """Raise EnvironmentProblem for the first problem found."""
    for problem in problems:
        if problem:
            raise EnvironmentProblem(problem)
