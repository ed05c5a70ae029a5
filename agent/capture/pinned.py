"""The ebpf-connect program set as the agent holds it: a pinned set (agent.bpf.pinned) plus what its
maps mean — reason counters, capture CIDRs, the mesh's destinations, node settings, each pod's inbound
mode and plaintext counts.

``ConnectSet.open`` checks each map against capture's ctypes mirror (agent.capture.abi). Imports no bcc.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Iterable

from agent.bpf import pins
from agent.bpf.counters import read_reason_counters
from agent.bpf.libbpf import Libbpf
from agent.bpf.pinned import PinnedSet
from agent.capture import abi

COUNTERS = "tcpmesh_counters"
CIDRS = "tcpmesh_capture_cidrs"
INBOUND_MODE = "tcpmesh_inbound_mode"
PLAINTEXT = "tcpmesh_plaintext"
MESH_DSTS = "tcpmesh_mesh_dsts"
SETTINGS = "tcpmesh_settings"
EGRESS = "tcpmesh_egress"
# every pinned map's (key, value) size; ring buffers have neither
LAYOUTS = {**{name: (ctypes.sizeof(key), ctypes.sizeof(value)) for name, (key, value) in abi.MAPS.items()},
           **{name: (0, 0) for name in abi.RINGBUF_MAPS}}


class ConnectSet(PinnedSet):
    @classmethod
    def open_connect(cls, libbpf: Libbpf, set_dir: Path, maps_dir: Path, programs: Iterable[str]) -> ConnectSet:
        return cls.open(libbpf, set_dir, maps_dir, programs, LAYOUTS)

    # ---- maps ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """{reason: total over CPUs}; empty when any reason could not be read (a partial read)."""
        return read_reason_counters(self.libbpf, self.map_fd(COUNTERS), abi.REASONS, COUNTERS) or {}

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

    def write_mesh_dsts(self, entries: dict[bytes, int]) -> None:
        """Make tcpmesh_mesh_dsts hold exactly ``entries`` ({bytes(DstKey): kind}): new entries go in
        before stale ones come out, so a destination that stays in the mesh is never missing."""
        fd = self.map_fd(MESH_DSTS)
        for key, kind in entries.items():
            self.libbpf.map_update(fd, key, bytes(abi.DstValue(kind=kind)), MESH_DSTS)
        for raw in self.libbpf.map_keys(fd, ctypes.sizeof(abi.DstKey), MESH_DSTS):
            if raw not in entries:
                self.libbpf.map_delete(fd, raw, MESH_DSTS)

    def mesh_dsts(self) -> dict[bytes, int]:
        """{bytes(DstKey): kind}, what tcpmesh_mesh_dsts holds (doctor and tests)."""
        fd = self.map_fd(MESH_DSTS)
        out = {}
        for raw in self.libbpf.map_keys(fd, ctypes.sizeof(abi.DstKey), MESH_DSTS):
            value = self.libbpf.map_lookup(fd, raw, ctypes.sizeof(abi.DstValue), MESH_DSTS)
            if value is not None:
                out[raw] = abi.DstValue.from_buffer_copy(value).kind
        return out

    def write_settings(self, flags: int) -> None:
        """The node-wide switches of tcpmesh_settings (abi.SETTING_*)."""
        self.libbpf.map_update(self.map_fd(SETTINGS), bytes(ctypes.c_int(0)), bytes(abi.Settings(flags=flags)),
                               SETTINGS)

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


def read_counters(bpffs_dir: str | os.PathLike, libbpf: Libbpf | None = None) -> dict[str, int]:
    """The reason counters of the maps pinned under ``bpffs_dir`` (for `doctor` and tests), summed over
    every maps directory there (normally one). {} when nothing is pinned."""
    libbpf = libbpf or Libbpf()
    totals: dict[str, int] = {}
    for maps_dir in pins.entries(Path(bpffs_dir)):
        if not maps_dir.name.startswith(pins.MAPS_PREFIX) or not (maps_dir / COUNTERS).exists():
            continue
        fd = libbpf.obj_get(str(maps_dir / COUNTERS))
        try:
            one = read_reason_counters(libbpf, fd, abi.REASONS, COUNTERS) or {}
        finally:
            os.close(fd)
        for name, value in one.items():
            totals[name] = totals.get(name, 0) + value
    return totals
