"""Create and remove the lab's cgroup v2 tree: ``<mount>/tcpmesh-lab-<name>/<node>/{agent,<pod>…}``.

Removal is rmdir bottom-up and never moves or kills a process: a cgroup that still holds processes
stays, and ``remove_tree`` reports it with its PIDs so the operator (or ``lab down``, for the PIDs the
lab recorded) can stop them first. Only ``kill_tree`` kills: the reap of a lab whose owner is gone
(agent/lab/owner.py) empties the lab's tree with cgroup.kill. Touches only directories under the lab's own cgroup.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import KernelError


@dataclass(frozen=True)
class BusyCgroup:
    path: str
    pids: tuple[int, ...]


def ensure_cgroup(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise KernelError("create cgroup", path, exc.errno, "is cgroup v2 mounted and writable?") from exc


def cgroup_pids(path: str) -> tuple[int, ...]:
    try:
        return tuple(int(pid) for pid in Path(path, "cgroup.procs").read_text().split())
    except FileNotFoundError:
        return ()


def tree_pids(root: str) -> dict[str, tuple[int, ...]]:
    """PIDs of every non-empty cgroup under (and including) ``root``."""
    found = {}
    for directory in _dirs_bottom_up(root):
        pids = cgroup_pids(directory)
        if pids:
            found[directory] = pids
    return found


KILL_SETTLE_SECONDS = 5.0


def kill_tree(root: str, settle_seconds: float = KILL_SETTLE_SECONDS) -> list[int]:
    """SIGKILL every process in ``root`` and below (cgroup.kill) and wait until the tree is empty.
    Returns the PIDs that were there; nothing if ``root`` does not exist."""
    pids = sorted({pid for found in tree_pids(root).values() for pid in found})
    if not pids:
        return []
    try:
        Path(root, "cgroup.kill").write_text("1")
    except FileNotFoundError:
        return []   # removed meanwhile
    except OSError as exc:
        raise KernelError("kill cgroup", root, exc.errno, "cgroup.kill needs Linux 5.14 or later") from exc
    deadline = time.monotonic() + settle_seconds
    while tree_pids(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


# how long remove_tree waits for processes still listed in a cgroup to leave it (exiting after a SIGKILL:
# under load 8-11 on two cores the lab's agents were seen still listed after stop_agents' waits)
EXITING_SECONDS = 10.0


def remove_tree(root: str, settle_seconds: float = 2.0,
                exit_seconds: float = EXITING_SECONDS) -> list[BusyCgroup]:
    """rmdir ``root`` and its children bottom-up. Returns the cgroups left behind because they hold processes.

    A cgroup whose processes have just exited can refuse rmdir (EBUSY) for a moment; such an empty
    cgroup is retried for up to ``settle_seconds``. One that still lists processes is retried for up to
    ``exit_seconds`` (for the whole tree) before it counts as busy: a process SIGKILLed a moment ago (the lab's own agent, or
    a child of it) can take seconds to leave its cgroup on a loaded machine, and must not be reported as
    one the lab did not start.
    """
    busy: list[BusyCgroup] = []
    exit_deadline = time.monotonic() + exit_seconds  # one bound for the whole tree
    for directory in _dirs_bottom_up(root):
        deadline = time.monotonic() + settle_seconds
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise KernelError("remove cgroup", directory, exc.errno) from exc
                pids = cgroup_pids(directory)
                if pids:
                    if time.monotonic() < exit_deadline:
                        time.sleep(0.05)
                        continue
                    busy.append(BusyCgroup(directory, pids))
                    break
                if _has_subdirs(directory):
                    break  # a busy child is reported on its own
                if time.monotonic() >= deadline:
                    busy.append(BusyCgroup(directory, ()))
                    break
                time.sleep(0.05)
    return busy


def _has_subdirs(path: str) -> bool:
    try:
        return any(entry.is_dir() for entry in os.scandir(path))
    except FileNotFoundError:
        return False


def _dirs_bottom_up(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    dirs = [root]
    for current, subdirs, _files in os.walk(root):
        dirs.extend(os.path.join(current, name) for name in subdirs)
    return sorted(dirs, key=lambda p: p.count("/"), reverse=True)


def process_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path (relative to the mount, starting with '/') of a process."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""
