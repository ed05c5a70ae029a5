"""Programs attached directly to a cgroup, found by name: ours are recognised by their program name,
so a restarted or newer agent finds (and detaches) what an older one attached. Imports no bcc."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from agent.bpf.libbpf import Libbpf


def attached(libbpf: Libbpf, cgroup_fd: int, attach_type: int, path: str) -> Iterator[tuple[int, str, int]]:
    """(id, name, fd) of each program attached to the cgroup for ``attach_type`` (not the inherited
    ones); the fd is the caller's only while the iteration stands on it."""
    for prog_id in libbpf.prog_query(cgroup_fd, attach_type, path):
        prog_fd = libbpf.prog_fd_by_id(prog_id)
        if prog_fd is None:
            continue  # went away meanwhile
        try:
            yield prog_id, libbpf.prog_info(prog_fd)[1], prog_fd
        finally:
            os.close(prog_fd)


def named(libbpf: Libbpf, cgroup_fd: int, attach_type: int, program: str, path: str) -> list[int]:
    """Ids of the programs called ``program`` attached there."""
    return [prog_id for prog_id, name, _ in attached(libbpf, cgroup_fd, attach_type, path) if name == program]


def detach_named(libbpf: Libbpf, cgroup_fd: int, attach_type: int, program: str, path: str,
                 keep_ids: Iterable[int] = ()) -> list[str]:
    """Detach every program called ``program`` there but those in ``keep_ids``; what went, as text."""
    keep = frozenset(keep_ids)
    removed = []
    for prog_id, name, prog_fd in attached(libbpf, cgroup_fd, attach_type, path):
        if name == program and prog_id not in keep and \
                libbpf.prog_detach(prog_fd, cgroup_fd, attach_type, f"{name} on {path}"):
            removed.append(f"{name} (id {prog_id}) on {path}")
    return removed
