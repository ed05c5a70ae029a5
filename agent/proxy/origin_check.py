"""Is a captured connection's client the pod its address says it is? A second fact beside the address.

The outbound proxy names the source workload by the client address it accepted. A pod that adds a
neighbour's address to its own interface — root in its own network namespace may — and gets the
replies (a spoofed ARP on a bridge network moves the node's neighbour entry to it) connects from
that address: taken for the neighbour, it had the neighbour's identity on the tunnel, past a DENY
naming its own (tests/hostile/test_hostile_stolen_address.py; docs/security.md). The ebpf-connect
origin record also carries the cgroup of the process that connected (``bpf_get_current_cgroup_id``),
which a pod cannot change; ``CgroupOwnership.problem`` compares it with the registry's cgroup of the
workload that holds the address: that cgroup or one below it (a container of the pod) — else the
connection is refused, naming the cgroup it came from and, when another local workload's cgroup
holds it, that workload.

Cgroup ids are the inode numbers of cgroup v2 directories (64-bit kernfs ids, not reused while the
node runs). The ids of each pod cgroup's subtree are cached; a miss rescans that subtree (a
container cgroup made since: a handful of directories), so the data path pays a dict and a set
lookup. No cgroup in the record (ebpf-tc, iptables: the packet left the socket behind): nothing to
compare, "" — those modes rest on the address alone (docs/security.md "Known gaps").
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from agent.registry.model import Workload

MAX_SCANNED = 4096  # directories read per subtree: a pod has a few containers
MAX_CACHED = 4096   # pod cgroups remembered; past it the cache starts again (pods come and go)


def subtree_ids(path: str) -> frozenset[int]:
    """The ids (inode numbers) of ``path`` and every cgroup below it; empty if it is gone."""
    ids: set[int] = set()
    for directory, _, _ in os.walk(path):
        try:
            ids.add(os.stat(directory).st_ino)
        except OSError:
            continue
        if len(ids) >= MAX_SCANNED:
            break
    return frozenset(ids)


class CgroupOwnership:
    def __init__(self, scan: Callable[[str], frozenset[int]] = subtree_ids) -> None:
        self._scan = scan
        self._ids: dict[str, frozenset[int]] = {}

    def owns(self, cgroup: str, cgroup_id: int) -> bool:
        """Is ``cgroup_id`` the cgroup ``cgroup`` or one below it?"""
        ids = self._ids.get(cgroup)
        if ids is None or cgroup_id not in ids:
            if len(self._ids) >= MAX_CACHED:
                self._ids.clear()
            ids = self._ids[cgroup] = self._scan(cgroup)
        return cgroup_id in ids

    def problem(self, workload: Workload, cgroup_id: int | None, local: Callable[[], Iterable[Workload]]) -> str:
        """"" when the connect came from ``workload``'s cgroup (or below), or when the capture recorded
        no cgroup; else why the connection is not ``workload``'s. ``local``: this node's workloads, asked
        only on a mismatch, to name the pod the cgroup belongs to."""
        if cgroup_id is None:
            return ""
        if workload.cgroup and self.owns(workload.cgroup, cgroup_id):
            return ""
        owner = next((w for w in local() if w.cgroup and w.key != workload.key and self.owns(w.cgroup, cgroup_id)),
                     None)
        came_from = (f"from {owner.key}'s cgroup {owner.cgroup}" if owner is not None
                     else f"from cgroup id {cgroup_id}, in no workload's cgroup of this node")
        mine = f"{workload.cgroup} or below" if workload.cgroup else "none in the registry"
        return (f"the client address {workload.ip} is {workload.key}'s, but the connect came {came_from}, "
                f"which is not {workload.key}'s ({mine}): a pod is using another pod's address (added to its "
                "own interface, with the replies spoofed to it) — refused, never taken for that pod's identity. "
                "Find the pod named here; a CNI with per-pod routes or anti-spoofing stops the replies reaching it")
