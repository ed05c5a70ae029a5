"""Cgroup v2 directories as attach targets: finding the mount, refusing the root, querying programs.

``cgroup_target`` is pure over the text of /proc/self/mounts. The syscall helpers (``prog_query``,
``prog_info``, ``prog_detach``) go through libbpf (libbpf.so.1, which libbcc itself links) and
raise AttachError with the errno. Must not import bcc: `tcpmesh cleanup` uses it without.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.capture.errors import AttachError
from agent.errors import ConfigError

PROG_NAME_OFFSET = 64  # offsetof(struct bpf_prog_info, name), stable UAPI
PROG_ID_OFFSET = 4     # offsetof(struct bpf_prog_info, id)
PROG_INFO_LEN = 80     # through name[16]; the kernel fills what fits


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


class Libbpf:
    """The few libbpf calls the loader needs that bcc's Python API lacks."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        self._lib = ctypes.CDLL(name, use_errno=True)

    def prog_query(self, cgroup_fd: int, attach_type: int, target: str) -> list[int]:
        """Ids of the programs attached to the cgroup for ``attach_type`` (not the inherited ones)."""
        size = 64
        for _ in range(3):
            ids = (ctypes.c_uint32 * size)()
            count = ctypes.c_uint32(size)
            flags = ctypes.c_uint32(0)
            rc = self._lib.bpf_prog_query(cgroup_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count))
            if rc == 0:
                return list(ids[: count.value])
            if _errno(rc) != errno.ENOSPC:
                break
            size = max(count.value, size * 2)  # more programs than room: the kernel says how many
        raise AttachError("BPF_PROG_QUERY", target, _errno(rc))

    def prog_fd_by_id(self, prog_id: int) -> int | None:
        fd = self._lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            if _errno(fd) == errno.ENOENT:
                return None  # went away meanwhile
            raise AttachError("BPF_PROG_GET_FD_BY_ID", f"program id {prog_id}", _errno(fd))
        return fd

    def prog_info(self, prog_fd: int) -> tuple[int, str]:
        """(id, name) of a loaded program."""
        buf = ctypes.create_string_buffer(PROG_INFO_LEN)
        length = ctypes.c_uint32(PROG_INFO_LEN)
        rc = self._lib.bpf_obj_get_info_by_fd(prog_fd, buf, ctypes.byref(length))
        if rc != 0:
            raise AttachError("BPF_OBJ_GET_INFO_BY_FD", f"program fd {prog_fd}", _errno(rc))
        raw = buf.raw
        prog_id = int.from_bytes(raw[PROG_ID_OFFSET:PROG_ID_OFFSET + 4], sys.byteorder)
        name = raw[PROG_NAME_OFFSET:PROG_NAME_OFFSET + 16].split(b"\0", 1)[0].decode(errors="replace")
        return prog_id, name

    def prog_detach(self, prog_fd: int, cgroup_fd: int, attach_type: int, target: str) -> bool:
        """Detach one program; False if it was not attached there (ENOENT)."""
        rc = self._lib.bpf_prog_detach2(prog_fd, cgroup_fd, attach_type)
        if rc != 0:
            if _errno(rc) == errno.ENOENT:
                return False
            raise AttachError("BPF_PROG_DETACH", target, _errno(rc))
        return True

    def prog_attach(self, prog_fd: int, cgroup_fd: int, attach_type: int, flags: int, target: str) -> None:
        rc = self._lib.bpf_prog_attach(prog_fd, cgroup_fd, attach_type, flags)
        if rc != 0:
            raise AttachError("BPF_PROG_ATTACH", target, _errno(rc))


def _errno(rc: int) -> int:
    # libbpf 1.x returns -errno and also sets errno.
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)
