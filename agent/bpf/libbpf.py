"""The few bpf(2) commands tcpmesh issues itself, through libbpf.so.1 and ctypes (no bcc, no LLVM).

The agent opens the programs and maps the loader pinned (``obj_get``), attaches and detaches
programs on cgroups, reads per-CPU counters and writes the CIDR map with these calls, so the
long-running process never maps libbcc or libLLVM. Every failure raises AttachError (a KernelError)
with the command, the object and the errno. Must not import bcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from dataclasses import dataclass

from agent.bpf.errors import AttachError

PROG_NAME_OFFSET = 64  # offsetof(struct bpf_prog_info, name), stable UAPI
PROG_ID_OFFSET = 4     # offsetof(struct bpf_prog_info, id)
PROG_INFO_LEN = 80     # through name[16]; the kernel fills what fits
MAP_INFO_LEN = 40      # struct bpf_map_info through name[16]
BPF_ANY = 0


@dataclass(frozen=True)
class MapInfo:
    """struct bpf_map_info, the fields tcpmesh checks (offsets 0..40 of the stable UAPI layout)."""

    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


class Libbpf:
    """Thin, errno-keeping wrappers; one instance per user (the CDLL handle is shared by the loader)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        self._lib = ctypes.CDLL(name, use_errno=True)
        self._lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        self._lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        for fn in ("bpf_map_lookup_elem", "bpf_map_delete_elem", "bpf_map_get_next_key", "bpf_map_update_elem"):
            getattr(self._lib, fn).restype = ctypes.c_int
        self._possible_cpus: int | None = None

    # ---- objects in bpffs --------------------------------------------------------------------

    def obj_get(self, path: str) -> int:
        """A new fd for the program or map pinned at ``path``."""
        fd = self._lib.bpf_obj_get(os.fsencode(path))
        if fd < 0:
            raise AttachError("BPF_OBJ_GET", path, _errno(fd))
        return fd

    def obj_pin(self, fd: int, path: str) -> None:
        rc = self._lib.bpf_obj_pin(fd, os.fsencode(path))
        if rc != 0:
            raise AttachError("BPF_OBJ_PIN", path, _errno(rc))

    # ---- programs ------------------------------------------------------------------------------

    def prog_query(self, cgroup_fd: int, attach_type: int, target: str) -> list[int]:
        """Ids of the programs attached to the cgroup for ``attach_type`` (not the inherited ones)."""
        size = 64
        rc = 0
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
        raw = self._info(prog_fd, PROG_INFO_LEN, f"program fd {prog_fd}")
        prog_id = int.from_bytes(raw[PROG_ID_OFFSET:PROG_ID_OFFSET + 4], sys.byteorder)
        name = raw[PROG_NAME_OFFSET:PROG_NAME_OFFSET + 16].split(b"\0", 1)[0].decode(errors="replace")
        return prog_id, name

    def prog_attach(self, prog_fd: int, cgroup_fd: int, attach_type: int, flags: int, target: str) -> bool:
        """Attach; False when this very program is already attached there.

        Under BPF_F_ALLOW_MULTI the kernel refuses the same program twice, with EINVAL (6.x) or
        EEXIST (older): then the cgroup is queried, and only a real refusal is an error.
        """
        rc = self._lib.bpf_prog_attach(prog_fd, cgroup_fd, attach_type, flags)
        if rc != 0:
            err = _errno(rc)
            if err in (errno.EINVAL, errno.EEXIST) and \
                    self.prog_info(prog_fd)[0] in self.prog_query(cgroup_fd, attach_type, target):
                return False
            raise AttachError("BPF_PROG_ATTACH", target, err)
        return True

    def prog_detach(self, prog_fd: int, cgroup_fd: int, attach_type: int, target: str) -> bool:
        """Detach one program; False if it was not attached there (ENOENT)."""
        rc = self._lib.bpf_prog_detach2(prog_fd, cgroup_fd, attach_type)
        if rc != 0:
            if _errno(rc) == errno.ENOENT:
                return False
            raise AttachError("BPF_PROG_DETACH", target, _errno(rc))
        return True

    # ---- maps ----------------------------------------------------------------------------------

    def map_info(self, map_fd: int, target: str) -> MapInfo:
        raw = self._info(map_fd, MAP_INFO_LEN, target)
        u32 = [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 24, 4)]
        name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
        return MapInfo(u32[0], u32[1], u32[2], u32[3], u32[4], u32[5], name)

    def possible_cpus(self) -> int:
        if self._possible_cpus is None:
            n = self._lib.libbpf_num_possible_cpus()
            if n <= 0:
                raise AttachError("libbpf_num_possible_cpus", "/sys/devices/system/cpu/possible", -n or errno.EIO)
            self._possible_cpus = n
        return self._possible_cpus

    def map_lookup(self, map_fd: int, key: bytes, value_size: int, target: str) -> bytes | None:
        """The value under ``key`` (``value_size`` bytes; per-CPU maps: CPUs x rounded size), or None."""
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(value_size)
        rc = self._lib.bpf_map_lookup_elem(map_fd, kbuf, vbuf)
        if rc != 0:
            if _errno(rc) == errno.ENOENT:
                return None
            raise AttachError("BPF_MAP_LOOKUP_ELEM", target, _errno(rc))
        return vbuf.raw

    def map_update(self, map_fd: int, key: bytes, value: bytes, target: str) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(value, len(value))
        rc = self._lib.bpf_map_update_elem(map_fd, kbuf, vbuf, ctypes.c_uint64(BPF_ANY))
        if rc != 0:
            raise AttachError("BPF_MAP_UPDATE_ELEM", target, _errno(rc))

    def map_delete(self, map_fd: int, key: bytes, target: str) -> bool:
        kbuf = ctypes.create_string_buffer(key, len(key))
        rc = self._lib.bpf_map_delete_elem(map_fd, kbuf)
        if rc != 0:
            if _errno(rc) == errno.ENOENT:
                return False
            raise AttachError("BPF_MAP_DELETE_ELEM", target, _errno(rc))
        return True

    def map_keys(self, map_fd: int, key_size: int, target: str, limit: int = 1 << 20) -> list[bytes]:
        """Every key of a (small) map, via BPF_MAP_GET_NEXT_KEY."""
        keys: list[bytes] = []
        prev = None
        nxt = ctypes.create_string_buffer(key_size)
        while len(keys) < limit:
            rc = self._lib.bpf_map_get_next_key(map_fd, prev, nxt)
            if rc != 0:
                if _errno(rc) == errno.ENOENT:
                    return keys
                raise AttachError("BPF_MAP_GET_NEXT_KEY", target, _errno(rc))
            keys.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, key_size)
        return keys

    def _info(self, fd: int, length: int, target: str) -> bytes:
        buf = ctypes.create_string_buffer(length)
        size = ctypes.c_uint32(length)
        rc = self._lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size))
        if rc != 0:
            raise AttachError("BPF_OBJ_GET_INFO_BY_FD", target, _errno(rc))
        return buf.raw


def _errno(rc: int) -> int:
    # libbpf 1.x returns -errno and also sets errno.
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)
