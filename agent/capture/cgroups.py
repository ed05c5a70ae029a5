"""Cgroup v2 directories as attach targets: finding the mount, refusing the root, querying programs.

``cgroup_target`` is pure over the text of /proc/self/mounts; ``walk`` lists a subtree. The
syscalls live in agent.bpf.libbpf.
Must not import bcc: the agent and `tcpmesh cleanup` use it without.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agent.errors import ConfigError


@dataclass(frozen=True)
class CgroupTarget:
    path: str     # resolved directory
    mount: str    # the cgroup2 mount it lives under


def cgroup_target(directory: str | os.PathLike, role: str, mounts_text: str) -> CgroupTarget:
    """Resolve ``directory`` to a non-root cgroup v2 directory, or raise ConfigError naming the fix."""
    path = os.path.realpath(directory)
    mounts = [line.split()[1] for line in mounts_text.splitlines()
              if len(line.split()) > 2 and line.split()[2] == "cgroup2"]
    owners = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    if not owners:
        raise ConfigError(f"{role} cgroup", str(directory), "is not inside a cgroup v2 mount",
                          f"use a directory under one of: {', '.join(mounts) or '(no cgroup2 mount found)'}")
    mount = max(owners, key=len)
    if path == mount:
        raise ConfigError(f"{role} cgroup", str(directory),
                          "is the root cgroup of the mount: attaching there would capture every process "
                          "on the host, the proxy included",
                          "give the workload's (or the proxy's) own child cgroup")
    return CgroupTarget(path=path, mount=mount)


def read_mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def is_within(path: str, ancestor: str) -> bool:
    """True when ``path`` is ``ancestor`` or below it (both resolved)."""
    path, ancestor = os.path.realpath(path), os.path.realpath(ancestor).rstrip("/")
    return path == ancestor or path.startswith(ancestor + "/")


def walk(root: str) -> Iterator[str]:
    """``root`` and every cgroup directory below it, parents before children; a vanishing child is skipped."""
    if not os.path.isdir(root):
        return
    yield root
    for current, subdirs, _files in os.walk(root):
        subdirs.sort()
        for name in subdirs:
            yield os.path.join(current, name)
