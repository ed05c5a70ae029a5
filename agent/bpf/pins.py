"""Where pinned program sets and their maps live in bpffs, and how a pinned set is recognised.

Layout under ``capture.bpffs_dir`` (default /sys/fs/bpf/tcpmesh/<node name>; docs/capture-restart.md),
for the ebpf-connect set (the kernel TCP stats name theirs ``tcpstats-…`` the same way):

    maps-v<ABI>-<maps hash>/tcpmesh_cookie_origin, tcpmesh_peer_origin, tcpmesh_capture_cidrs,
                            tcpmesh_counters, ...       (created or reused by bcc at compile time)
    set-v<ABI>-<set hash>/tcpmesh_conn4, ..., tcpmesh_guard6      (pinned by the loader)

The maps hash covers everything that defines a map (the owner's ``map_sources``, for ebpf-connect
tcpmesh_abi.h and lib/maps.h; the map size); the
set hash covers every BPF source file, every compile flag and the maps directory the programs use.
A restarted agent whose names match adopts the pinned set without compiling; otherwise the loader
makes a new set (sharing the maps when their hash is unchanged) and the agent swaps to it.

``set_names`` and ``bpffs_mount_of`` are pure; ``ensure_bpffs``, ``complete``, ``remove_tree`` and
``locked`` touch the file system. Must not import bcc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from agent.errors import EnvironmentProblem, KernelError

BPFFS_MOUNT = "/sys/fs/bpf"
DEFAULT_ROOT = f"{BPFFS_MOUNT}/tcpmesh"
# rmdir of a directory that is a mount point — under systemd the unit's ReadWritePaths= bind mount of
# DEFAULT_ROOT (or of a drop-in's bpffs_dir) — fails with EBUSY, or with EROFS first when its parent is
# on a read-only mount, as /sys/fs/bpf is in the unit's sandbox (ProtectKernelTunables=; measured in a
# Debian 12 VM, systemd 252). Emptied, such a directory is harmless and goes with the sandbox.
MOUNT_POINT_ERRNOS = frozenset({errno.EBUSY, errno.EROFS})
SET_PREFIX = "set-"
MAPS_PREFIX = "maps-"
STAGING_PREFIX = "staging-"  # bpffs refuses dots in names (EPERM)
HASH_CHARS = 16
# Bump when the loader pins differently (names, layout): a pinned set from before is then not adopted.
LAYOUT_VERSION = 1


def default_bpffs_dir(node_name: str) -> str:
    return f"{DEFAULT_ROOT}/{node_name}"


@dataclass(frozen=True)
class SetNames:
    maps: str   # maps-v<ABI>-<hash>
    set: str    # set-v<ABI>-<hash>


def set_names(source_dir: Path, source_name: str, abi_version: int, max_connections: int,
              program_flags: Sequence[str], programs: Iterable[str], *, map_sources: Sequence[str]) -> SetNames:
    """The pin directory names for this source tree and these flags (pure apart from reading sources).
    ``map_sources``: the files under ``source_dir`` that define the maps (their layout and size)."""
    maps = hashlib.sha256(f"layout {LAYOUT_VERSION} abi {abi_version} conns {max_connections}\n".encode())
    for rel in map_sources:
        maps.update(_file_digest(source_dir / rel, rel))
    maps_name = f"{MAPS_PREFIX}v{abi_version}-{maps.hexdigest()[:HASH_CHARS]}"
    prog = hashlib.sha256(f"layout {LAYOUT_VERSION} maps {maps_name}\n".encode())
    for flag in program_flags:
        prog.update(f"flag {flag}\n".encode())
    for name in programs:
        prog.update(f"program {name}\n".encode())
    for path in bpf_sources(source_dir, source_name):
        prog.update(_file_digest(path, str(path.relative_to(source_dir))))
    return SetNames(maps=maps_name, set=f"{SET_PREFIX}v{abi_version}-{prog.hexdigest()[:HASH_CHARS]}")


def bpf_sources(source_dir: Path, source_name: str) -> list[Path]:
    """The main C file and every header it can include from the tree (the kernel stub is UAPI only)."""
    headers = [p for pattern in ("lib/*.h", "include/*.h") for p in source_dir.glob(pattern)]
    return [source_dir / source_name] + sorted(headers)


def _file_digest(path: Path, label: str) -> bytes:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise EnvironmentProblem(f"BPF source {path} is unreadable ({exc.strerror}): the tcpmesh tree is incomplete") \
            from exc
    return f"file {label} {hashlib.sha256(content).hexdigest()}\n".encode()


# ---- bpffs ---------------------------------------------------------------------------------------

def bpffs_mount_of(path: str, mounts_text: str) -> str | None:
    """The bpf filesystem mount ``path`` lives in, from the text of /proc/self/mounts."""
    path = os.path.realpath(path) if os.path.isabs(path) else path
    best = None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "bpf":
            point = parts[1]
            if path == point or path.startswith(point.rstrip("/") + "/"):
                best = point if best is None or len(point) > len(best) else best
    return best


def ensure_bpffs(directory: str, mounts_file: str = "/proc/self/mounts") -> str:
    """Make sure ``directory`` is inside a bpf filesystem, mounting one at /sys/fs/bpf if needed."""
    mounts = Path(mounts_file).read_text()
    point = bpffs_mount_of(directory, mounts)
    if point is None:
        if not (directory == BPFFS_MOUNT or directory.startswith(BPFFS_MOUNT + "/")):
            raise EnvironmentProblem(f"capture.bpffs_dir {directory} is not on a bpf filesystem: use a directory "
                                     f"under {BPFFS_MOUNT} (mounted automatically) or mount bpffs there first")
        _mount_bpffs(BPFFS_MOUNT)
        point = BPFFS_MOUNT
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise EnvironmentProblem(
            f"capture.bpffs_dir {directory}: cannot create it ({os.strerror(exc.errno)}): tcpmesh pins its "
            f"programs there. Under systemd the unit makes only {DEFAULT_ROOT} writable in bpffs "
            f"(ReadWritePaths=); use a directory below it, or add a drop-in (`systemctl edit tcpmesh-agent`) "
            f"with ReadWritePaths=-{directory} and create it before the start") from exc
    return point


def _mount_bpffs(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    if libc.mount(b"bpf", target.encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            return  # mounted meanwhile
        raise KernelError("mount -t bpf", target, err, "tcpmesh pins its programs there; mount bpffs at "
                          f"{target} (DaemonSet: mount the host's {target})")


def complete(directory: Path, names: Iterable[str]) -> bool:
    """True when every pin ``names`` exists in ``directory``."""
    return directory.is_dir() and all((directory / name).exists() for name in names)


def entries(directory: Path) -> list[Path]:
    """The pins and directories directly in ``directory`` (none if it does not exist)."""
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def remove_tree(path: Path, dry_run: bool = False) -> list[str]:
    """Unlink every pin under ``path`` and remove its directories, bottom up. Returns what went."""
    removed: list[str] = []
    if not path.exists() and not path.is_symlink():
        return removed
    if path.is_dir() and not path.is_symlink():
        for child in entries(path):
            removed += remove_tree(child, dry_run)
        if not dry_run:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in MOUNT_POINT_ERRNOS:
                    raise
                return removed  # emptied; a mount point of the unit's sandbox stays (MOUNT_POINT_ERRNOS)
        removed.append(f"{path}/")
        return removed
    if not dry_run:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    removed.append(str(path))
    return removed


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """An exclusive flock on the pin directory: one loader or agent changes a node's pins at a time."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def prune(directory: Path, keep: Iterable[str], prefixes: tuple[str, ...]) -> list[str]:
    """Remove every entry of ``directory`` whose name starts with one of ``prefixes`` and is not in
    ``keep`` (older sets and maps directories of one owner). Returns what went."""
    kept = set(keep)
    removed: list[str] = []
    for entry in entries(directory):
        if entry.name not in kept and entry.name.startswith(prefixes):
            removed += remove_tree(entry)
    return removed
