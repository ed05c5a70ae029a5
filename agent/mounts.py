"""The host's mount table, read once where a default depends on it: where cgroup v2 is mounted.

Below agent.config (``capture.cgroup_root: auto``) and agent.host.checks (`tcpmesh doctor`, the lab), so both
find the mount the same way. Reads ``/proc/self/mounts`` when asked; imports nothing of agent/.
"""

from __future__ import annotations

from pathlib import Path

# systemd's hybrid hierarchy mounts cgroup v2 at /sys/fs/cgroup/unified (v1 controllers beside it); its unified
# hierarchy (Debian 11+, Ubuntu 21.10+, RHEL 9, every Kubernetes node with cgroup v2) at /sys/fs/cgroup
CGROUP2_MOUNT_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
MOUNTS_FILE = "/proc/self/mounts"


def find_cgroup2_mount(mounts_file: str = MOUNTS_FILE) -> str | None:
    """The cgroup v2 mount point: a standard place first, else the first cgroup2 mount; None if there is none."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    points = [line.split()[1] for line in lines if len(line.split()) > 2 and line.split()[2] == "cgroup2"]
    for candidate in CGROUP2_MOUNT_CANDIDATES:
        if candidate in points:
            return candidate
    return points[0] if points else None
