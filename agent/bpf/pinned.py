"""A program set pinned in bpffs: made once by the loader child, adopted by every later agent start.

``adopt_or_pin(request)``: the set named in ``request.pin_to`` is adopted when every program and map
pin is there (nothing compiled); otherwise an incomplete set is removed (never half-adopted) and the
loader child compiles and pins it. ``PinnedSet.open`` then takes fds of every program of the set
directory and every map of the maps directory (bpf_obj_get) and checks each map's key and value size
against the owner's mirror. The pins keep programs and maps alive after ``close()``. Imports no bcc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Self

from agent.bpf import pins
from agent.bpf.errors import NotLoaded
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import DEFAULT_TIMEOUT, Loaded, LoadRequest, load
from agent.bpf.maps import Layouts, check_layout


def adopt_or_pin(request: LoadRequest, maps: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> Loaded | None:
    """None when the set of ``request.pin_to`` is pinned completely (adopted); else what the child did."""
    pin_to = request.pin_to
    if pin_to is None:
        raise ValueError("adopt_or_pin needs a request with pin_to")
    set_dir = Path(pin_to.bpffs_dir) / pin_to.set_name
    programs = [program.name for program in request.programs]
    if pins.complete(set_dir, programs) and pins.complete(Path(pin_to.bpffs_dir) / pin_to.maps_name, maps):
        return None
    if pins.complete(set_dir, programs):  # programs pinned, a map pin gone: never half-adopt
        pins.remove_tree(set_dir)
    return load(request, timeout)


class PinnedSet:
    """The agent's fds of one pinned set: programs (and their ids) and the maps they use."""

    def __init__(self, libbpf: Libbpf, set_dir: Path, maps_dir: Path, prog_fds: dict[str, int],
                 prog_ids: dict[str, int], map_fds: dict[str, int]) -> None:
        self.libbpf = libbpf
        self.set_dir = set_dir
        self.maps_dir = maps_dir
        self._prog_fds = prog_fds
        self.prog_ids = prog_ids
        self._map_fds = map_fds

    @classmethod
    def open(cls, libbpf: Libbpf, set_dir: Path, maps_dir: Path, programs: Iterable[str], layouts: Layouts) -> Self:
        fds: list[int] = []
        try:
            prog_fds, prog_ids = {}, {}
            for name in programs:
                fd = libbpf.obj_get(str(set_dir / name))
                fds.append(fd)
                prog_ids[name], _ = libbpf.prog_info(fd)
                prog_fds[name] = fd
            map_fds = {}
            for name, (key_size, value_size) in layouts.items():
                path = str(maps_dir / name)
                fd = libbpf.obj_get(path)
                fds.append(fd)
                check_layout(libbpf, fd, f"pinned map {path}", key_size, value_size)
                map_fds[name] = fd
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(libbpf, set_dir, maps_dir, prog_fds, prog_ids, map_fds)

    def prog_fd(self, name: str) -> int:
        if not self._prog_fds:
            raise NotLoaded(f"the pinned program set {self.set_dir} is closed")
        return self._prog_fds[name]

    def map_fd(self, name: str) -> int:
        if not self._map_fds:
            raise NotLoaded(f"the pinned program set {self.set_dir} is closed")
        return self._map_fds[name]

    @property
    def own_ids(self) -> frozenset[int]:
        return frozenset(self.prog_ids.values())

    def close(self) -> None:
        """Close our fds. The pins (and every attachment) stay."""
        for fd in list(self._prog_fds.values()) + list(self._map_fds.values()):
            os.close(fd)
        self._prog_fds = {}
        self._map_fds = {}
