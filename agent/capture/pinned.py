"""A pinned program set opened by the agent: program fds and ids, map fds, counters and CIDR writes.

``PinnedSet.open`` takes file descriptors for every program of the set directory and every map of
the maps directory (bpf_obj_get), and checks each map's key and value size against the ctypes
mirror (agent.capture.abi), so an agent never writes into a map of another layout. Imports no bcc.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Iterable

from agent.capture import abi
from agent.bpf.counters import sum_per_cpu
from agent.bpf.errors import AttachError
from agent.capture.errors import NotLoaded
from agent.bpf.libbpf import Libbpf
from agent.errors import TcpmeshError

COUNTERS = "tcpmesh_counters"
CIDRS = "tcpmesh_capture_cidrs"
INBOUND_MODE = "tcpmesh_inbound_mode"
PLAINTEXT = "tcpmesh_plaintext"


class PinLayoutMismatch(TcpmeshError):
    """A pinned map does not have the layout this agent's ABI mirror expects."""


class PinnedSet:
    def __init__(self, libbpf: Libbpf, set_dir: Path, maps_dir: Path, prog_fds: dict[str, int],
                 prog_ids: dict[str, int], map_fds: dict[str, int]) -> None:
        self.libbpf = libbpf
        self.set_dir = set_dir
        self.maps_dir = maps_dir
        self._prog_fds = prog_fds
        self.prog_ids = prog_ids
        self._map_fds = map_fds

    @classmethod
    def open(cls, libbpf: Libbpf, set_dir: Path, maps_dir: Path, programs: Iterable[str]) -> "PinnedSet":
        fds: list[int] = []
        try:
            prog_fds, prog_ids = {}, {}
            for name in programs:
                fd = libbpf.obj_get(str(set_dir / name))
                fds.append(fd)
                prog_ids[name], _ = libbpf.prog_info(fd)
                prog_fds[name] = fd
            map_fds = {}
            for name, (key, value) in abi.MAPS.items():
                path = str(maps_dir / name)
                fd = libbpf.obj_get(path)
                fds.append(fd)
                _check_layout(libbpf.map_info(fd, path), path, ctypes.sizeof(key), ctypes.sizeof(value))
                map_fds[name] = fd
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(libbpf, set_dir, maps_dir, prog_fds, prog_ids, map_fds)

    def prog_fd(self, name: str) -> int:
        if not self._prog_fds:
            raise NotLoaded("the pinned program set is closed")
        return self._prog_fds[name]

    def map_fd(self, name: str) -> int:
        if not self._map_fds:
            raise NotLoaded("the pinned program set is closed")
        return self._map_fds[name]

    @property
    def own_ids(self) -> frozenset[int]:
        return frozenset(self.prog_ids.values())

    def close(self) -> None:
        """Close our fds. The pins (and every attachment) stay: that is what keeps capture closed."""
        for fd in list(self._prog_fds.values()) + list(self._map_fds.values()):
            os.close(fd)
        self._prog_fds = {}
        self._map_fds = {}

    # ---- maps ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """{reason: total over CPUs}; empty when any reason could not be read (a partial read)."""
        fd = self.map_fd(COUNTERS)
        cpus = self.libbpf.possible_cpus()
        per_reason: dict[int, list[int] | None] = {}
        for code in range(abi.REASON_MAX):
            try:
                raw = self.libbpf.map_lookup(fd, bytes(ctypes.c_int(code)), cpus * 8, COUNTERS)
            except AttachError:
                raw = None
            per_reason[code] = None if raw is None else \
                [int.from_bytes(raw[i * 8:(i + 1) * 8], sys.byteorder) for i in range(cpus)]
        return sum_per_cpu(per_reason, abi.REASONS) or {}

    def write_cidrs(self, entries: dict[tuple[int, int], int]) -> None:
        """Make the LPM trie hold exactly ``entries``: new entries go in before stale ones come out."""
        fd = self.map_fd(CIDRS)
        for (prefixlen, ip4), action in entries.items():
            self.libbpf.map_update(fd, bytes(abi.CidrKey(prefixlen=prefixlen, ip4=ip4)),
                                   bytes(abi.CidrValue(action=action)), CIDRS)
        for raw in self.libbpf.map_keys(fd, ctypes.sizeof(abi.CidrKey), CIDRS):
            key = abi.CidrKey.from_buffer_copy(raw)
            if (key.prefixlen, key.ip4) not in entries:
                self.libbpf.map_delete(fd, raw, CIDRS)

    def set_inbound_mode(self, cgroup_id: int, mode: int) -> None:
        """STRICT or PERMISSIVE for the pod whose cgroup has ``cgroup_id`` (the directory's inode)."""
        self.libbpf.map_update(self.map_fd(INBOUND_MODE), bytes(ctypes.c_uint64(cgroup_id)),
                               bytes(ctypes.c_uint32(mode)), INBOUND_MODE)

    def forget_pod(self, cgroup_id: int) -> None:
        """Drop a departed pod's inbound mode and plaintext counters."""
        key = bytes(ctypes.c_uint64(cgroup_id))
        self.libbpf.map_delete(self.map_fd(INBOUND_MODE), key, INBOUND_MODE)
        self.libbpf.map_delete(self.map_fd(PLAINTEXT), key, PLAINTEXT)

    def plaintext(self) -> dict[int, tuple[int, int]]:
        """{pod cgroup id: (SYNs rejected, SYNs accepted)} from outside the mesh, summed over CPUs."""
        fd = self.map_fd(PLAINTEXT)
        cpus = self.libbpf.possible_cpus()
        size = ctypes.sizeof(abi.Plaintext)
        out: dict[int, tuple[int, int]] = {}
        for raw_key in self.libbpf.map_keys(fd, 8, PLAINTEXT):
            raw = self.libbpf.map_lookup(fd, raw_key, cpus * size, PLAINTEXT)
            if raw is None:
                continue
            slots = [abi.Plaintext.from_buffer_copy(raw, i * size) for i in range(cpus)]
            out[int.from_bytes(raw_key, sys.byteorder)] = (sum(c.rejected for c in slots),
                                                            sum(c.accepted for c in slots))
        return out

    def cidrs(self) -> dict[tuple[int, int], int]:
        fd = self.map_fd(CIDRS)
        out = {}
        for raw in self.libbpf.map_keys(fd, ctypes.sizeof(abi.CidrKey), CIDRS):
            value = self.libbpf.map_lookup(fd, raw, ctypes.sizeof(abi.CidrValue), CIDRS)
            if value is not None:
                key = abi.CidrKey.from_buffer_copy(raw)
                out[(key.prefixlen, key.ip4)] = abi.CidrValue.from_buffer_copy(value).action
        return out


def _check_layout(info, path: str, key_size: int, value_size: int) -> None:
    if (info.key_size, info.value_size) != (key_size, value_size):
        raise PinLayoutMismatch(f"pinned map {path} has key/value sizes {info.key_size}/{info.value_size}, this agent "
                                f"expects {key_size}/{value_size}: it was made by another tcpmesh version; run "
                                "`tcpmesh cleanup` (stop the agent first) and start again")


def read_counters(bpffs_dir: str | os.PathLike, libbpf: Libbpf | None = None) -> dict[str, int]:
    """The reason counters of the maps pinned under ``bpffs_dir`` (for `doctor` and tests), summed over
    every maps directory there (normally one). {} when nothing is pinned."""
    from agent.bpf import pins

    libbpf = libbpf or Libbpf()
    totals: dict[str, int] = {}
    for maps_dir in pins.entries(Path(bpffs_dir)):
        if not maps_dir.name.startswith(pins.MAPS_PREFIX) or not (maps_dir / COUNTERS).exists():
            continue
        fd = libbpf.obj_get(str(maps_dir / COUNTERS))
        try:
            one = PinnedSet(libbpf, Path(), maps_dir, {}, {}, {COUNTERS: fd}).counters()
        finally:
            os.close(fd)
        for name, value in one.items():
            totals[name] = totals.get(name, 0) + value
    return totals
