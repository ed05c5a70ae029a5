"""Which BPF programs are attached to a cgroup, asked of the kernel directly (BPF_PROG_QUERY per
attach type, through the bpf(2) syscall): the bpf tier's witness for attach, detach and cleanup.

Not bpftool: Debian 12's bpftool exits 255 on Debian 11's 5.10 kernel ("can't query bpf programs
attached to …": the kernel refuses a query bpftool makes that 5.10 predates), and not the product's own
libbpf wrapper (agent/bpf/libbpf.py), whose attach and detach are what these tests check. Only the
cgroup attach types are asked (other types' queries answer for other objects, ENODEV or EBADF with a
cgroup's fd); one this kernel does not know answers EINVAL and is skipped, as it has nothing attached.
Standard library only; x86_64 and aarch64 syscall numbers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 13, 15, 16
ATTR_SIZE = 256                    # >= sizeof(union bpf_attr) of any kernel; the tail stays zero
PROG_INFO_LEN, PROG_INFO_ID, PROG_INFO_NAME = 80, 4, 64   # struct bpf_prog_info: id at 4, name[16] at 64
# the cgroup attach types of uapi/linux/bpf.h's enum bpf_attach_type (5.10 knows all of these)
ATTACH_TYPE_NAMES = {0: "ingress", 1: "egress", 2: "sock_create", 3: "sock_ops", 6: "device", 8: "bind4",
                     9: "bind6", 10: "connect4", 11: "connect6", 12: "post_bind4", 13: "post_bind6",
                     14: "sendmsg4", 15: "sendmsg6", 18: "sysctl", 19: "recvmsg4", 20: "recvmsg6",
                     21: "getsockopt", 22: "setsockopt", 29: "getpeername4", 30: "getpeername6",
                     31: "getsockname4", 32: "getsockname6", 34: "sock_release"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    rc = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def _query(cgroup_fd: int, attach_type: int) -> list[int]:
    size = 64
    while True:
        ids = (ctypes.c_uint32 * size)()
        # the whole union bpf_attr, zeroed: newer kernels write more of the query back (its revision)
        attr = ctypes.create_string_buffer(ATTR_SIZE)   # query: fd, type, flags, attach flags, ids, count
        struct.pack_into("=IIIIQI", attr, 0, cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), size)
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                size *= 2
                continue
            raise
        count = struct.unpack_from("=I", attr, 24)[0]
        return list(ids[:count])


def _name(prog_id: int) -> str:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=I", attr, 0, prog_id)
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    try:
        info = ctypes.create_string_buffer(PROG_INFO_LEN)
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=IIQ", attr, 0, fd, PROG_INFO_LEN, ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        return info.raw[PROG_INFO_NAME:PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def cgroup_programs(path: str | os.PathLike) -> list[tuple[str, int, str]]:
    """(attach type, program id, program name) of every program attached directly to the cgroup."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = []
        for attach_type in ATTACH_TYPE_NAMES:
            try:
                ids = _query(fd, attach_type)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue   # an attach type this kernel does not know
                raise
            for prog_id in ids:
                try:
                    found.append((ATTACH_TYPE_NAMES[attach_type], prog_id, _name(prog_id)))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:   # unloaded meanwhile
                        raise
        return found
    finally:
        os.close(fd)


def cgroup_table(path: str | os.PathLike) -> str:
    """The programs as a table in bpftool's shape (a header line, then one line per program)."""
    rows = [f"{prog_id:<8} {attach:<15} {name}" for attach, prog_id, name in cgroup_programs(path)]
    return "\n".join(["ID       AttachType      Name", *rows]) + "\n"
