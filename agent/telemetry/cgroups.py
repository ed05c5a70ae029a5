"""Naming a cgroup v2 id (what the BPF hook saw at connect time) by its path, for access records.

A cgroup v2 id is the inode number of its directory. ``set_roots`` (control plane, on every registry
change) records the local workloads' cgroup directories; ``enrich`` (the access log's writer thread,
never the data path) looks an id up and, on a miss, rescans those directories — at most once every
``RESCAN_SECONDS`` — so processes in child cgroups (containers of a pod) are named too.
"""

from __future__ import annotations

import os
import time
from typing import Any

RESCAN_SECONDS = 5.0
MAX_ENTRIES = 65536


class CgroupNames:
    def __init__(self) -> None:
        self._roots: tuple[str, ...] = ()
        self._names: dict[int, str] = {}
        self._scanned_at = float("-inf")

    def set_roots(self, roots: list[str]) -> None:
        self._roots = tuple(sorted(set(roots)))
        self._scanned_at = float("-inf")  # rescan on the next miss

    def name(self, cgroup_id: int) -> str | None:
        found = self._names.get(cgroup_id)
        if found is None and time.monotonic() - self._scanned_at >= RESCAN_SECONDS:
            self._scan()
            found = self._names.get(cgroup_id)
        return found

    def enrich(self, record: dict[str, Any]) -> None:
        cgroup_id = record.get("cgroup_id")
        if cgroup_id:
            record["cgroup"] = self.name(cgroup_id)

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        names: dict[int, str] = {}
        for root in self._roots:
            for path, dirs, _ in os.walk(root):
                try:
                    names[os.stat(path).st_ino] = path
                except OSError:
                    continue
                if len(names) >= MAX_ENTRIES:
                    break
        self._names = names
