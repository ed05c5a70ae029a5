"""The host's mount table, read once where a default depends on it: where cgroup v2 is mounted — or, when it is
not, where this host's layout puts it and the commands that mount it there.

The one place that answers it: agent.config (``capture.cgroup_root: auto``), agent.host.checks (`tcpmesh
doctor`'s cgroup2 row and its fix) and the lab (`tcpmesh lab up`) all ask ``host_cgroup2`` and resolve with
``cgroup_root_path``, so the three never disagree. Reads ``/proc/self/mounts`` when asked (``cgroup2_of`` is
pure); imports nothing of agent/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT_AUTO = "auto"  # capture.cgroup_root (and `tcpmesh lab up`): the host's cgroup v2 mount
# systemd's unified hierarchy (Debian 11+, Ubuntu 21.10+, RHEL 9, every Kubernetes node with cgroup v2): cgroup v2
# alone at /sys/fs/cgroup. Its hybrid hierarchy: a tmpfs at /sys/fs/cgroup holding the v1 controllers, cgroup v2
# beside them at /sys/fs/cgroup/unified (its legacy one: the same without the unified mount).
UNIFIED_MOUNT = "/sys/fs/cgroup"
HYBRID_MOUNT = "/sys/fs/cgroup/unified"
CGROUP2_MOUNT_CANDIDATES = (HYBRID_MOUNT, UNIFIED_MOUNT)
MOUNTS_FILE = "/proc/self/mounts"


@dataclass(frozen=True)
class Cgroup2:
    """This host's cgroup v2: ``mount`` (None: not mounted); ``place``, the mount or else where this host's layout
    puts it (what ``auto`` resolves to); ``fix``, the commands that mount it there ("" when mounted)."""
    mount: str | None
    place: str
    fix: str = ""


def cgroup2_of(mounts_text: str) -> Cgroup2:
    """Pure: the cgroup v2 of a host whose ``/proc/self/mounts`` reads ``mounts_text``. Mounted: a standard place
    first, else the first cgroup2 mount. Not mounted, on a host with cgroup v1 hierarchies under /sys/fs/cgroup
    (systemd's legacy layout): the hybrid layout's place, /sys/fs/cgroup/unified — /sys/fs/cgroup itself is the
    tmpfs holding them. Else (nothing there: a minimal or container root): /sys/fs/cgroup."""
    rows = [line.split() for line in mounts_text.splitlines()]
    mounts = [(row[1], row[2], row[3].split(",") if len(row) > 3 else []) for row in rows if len(row) > 2]
    points = [point for point, fstype, _ in mounts if fstype == "cgroup2"]
    found = next((c for c in CGROUP2_MOUNT_CANDIDATES if c in points), points[0] if points else None)
    if found is not None:
        return Cgroup2(found, found)
    v1_layout = any(fstype == "cgroup" and point.startswith(UNIFIED_MOUNT + "/") for point, fstype, _ in mounts)
    if not v1_layout:
        return Cgroup2(None, UNIFIED_MOUNT, f"mount it: mount -t cgroup2 none {UNIFIED_MOUNT}")
    tmpfs_read_only = any(point == UNIFIED_MOUNT and "ro" in options for point, _, options in mounts)
    remount = f"mount -o remount,rw {UNIFIED_MOUNT} && " if tmpfs_read_only else ""
    return Cgroup2(None, HYBRID_MOUNT, (
        f"this host has only cgroup v1 hierarchies under {UNIFIED_MOUNT}; boot it with "
        f"systemd.unified_cgroup_hierarchy=1 on the kernel command line (cgroup v2 alone at {UNIFIED_MOUNT}, "
        f"Debian 11+'s default), or mount cgroup v2 where systemd's hybrid layout has it: "
        f"{remount}mkdir -p {HYBRID_MOUNT} && mount -t cgroup2 none {HYBRID_MOUNT}"))


def host_cgroup2(mounts_file: str = MOUNTS_FILE) -> Cgroup2:
    """``cgroup2_of`` this host's mount table (one read; unreadable: as if nothing were mounted)."""
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        text = ""
    return cgroup2_of(text)


def find_cgroup2_mount(mounts_file: str = MOUNTS_FILE) -> str | None:
    """The cgroup v2 mount point; None if there is none."""
    return host_cgroup2(mounts_file).mount


def cgroup_root_path(root: str | None, cgroup2: Cgroup2) -> str:
    """Pure: a cgroup root as given (``capture.cgroup_root``, ``lab_up(cgroup_root=)``): ``auto`` (or nothing)
    is ``cgroup2.place``; any other value stays as written."""
    return cgroup2.place if root in (None, "", CGROUP_ROOT_AUTO) else root
