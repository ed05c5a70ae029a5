"""The effective registry: the static file plus workloads added at run time (admin socket), and the
diff between two snapshots as far as this node's capture and identities are concerned.

Pure: snapshots in, snapshot or plan out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from agent.errors import ConfigError
from agent.registry.model import Registry, Workload


def merge(base: Registry, added: Iterable[Workload]) -> Registry:
    """``base`` with ``added`` workloads; an added workload replaces a base one with the same key.

    Raises ConfigError when an added workload names an unknown node, takes another workload's IP, or
    has a cgroup at or below another workload's cgroup on its node.
    """
    added = tuple(added)
    replaced = {w.key for w in added}
    workloads = [w for w in base.workloads if w.key not in replaced] + list(added)
    by_ip: dict[str, Workload] = {}
    for workload in workloads:
        if workload.node not in base.nodes:
            raise ConfigError(f"workload {workload.key}.node", workload.node, "names no node of the registry",
                              f"known nodes: {', '.join(sorted(base.nodes)) or 'none'}")
        for ip in workload.addresses:
            other = by_ip.get(ip)
            if other is not None:
                raise ConfigError(f"workload {workload.key}.ip", ip, f"is already the IP of {other.key}",
                                  "each workload needs its own IP; delete the other one first")
            by_ip[ip] = workload
    _no_nested_cgroups(workloads)
    return Registry.build(base.trust_domain, base.nodes.values(), workloads, base.services)


def _no_nested_cgroups(workloads: list[Workload]) -> None:
    """A workload is its cgroup and every cgroup below it (the kernel finds a socket's workload as the
    first registered cgroup among its ancestors), so two workloads of one node never share a cgroup
    subtree."""
    owners: dict[tuple[str, str], Workload] = {}
    for workload in (w for w in workloads if w.cgroup):
        other = owners.setdefault((workload.node, workload.cgroup.rstrip("/")), workload)
        if other is not workload:
            raise ConfigError(f"workload {workload.key}.cgroup", workload.cgroup, f"is also the cgroup of {other.key}",
                              "each workload needs its own cgroup")
    for (node, path), workload in owners.items():
        parent = path.rpartition("/")[0]
        while parent:
            other = owners.get((node, parent))
            if other is not None:
                raise ConfigError(f"workload {workload.key}.cgroup", workload.cgroup,
                                  f"is inside the cgroup of {other.key} ({other.cgroup})",
                                  "a workload is its cgroup and every cgroup below it: give each workload a cgroup "
                                  "outside the others' (the pod cgroup, never a container's)")
            parent = parent.rpartition("/")[0]


@dataclass(frozen=True)
class LocalPlan:
    """What changes on this node between two snapshots."""

    attach: tuple[Workload, ...]
    detach: tuple[Workload, ...]

    @property
    def empty(self) -> bool:
        return not self.attach and not self.detach


def plan_local(old: Registry | None, new: Registry, node_name: str) -> LocalPlan:
    """Workloads to attach (new, or whose capture-relevant fields changed) and to detach (gone or changed)."""
    before = {w.key: w for w in old.local(node_name)} if old is not None else {}
    after = {w.key: w for w in new.local(node_name)}
    attach = [w for key, w in after.items() if _capture_view(before.get(key)) != _capture_view(w)]
    detach = [w for key, w in before.items() if _capture_view(after.get(key)) != _capture_view(w)]
    return LocalPlan(tuple(sorted(attach, key=lambda w: w.key)), tuple(sorted(detach, key=lambda w: w.key)))


def _capture_view(workload: Workload | None) -> tuple | None:
    if workload is None:
        return None
    return (workload.ip, workload.cgroup, workload.namespace, workload.service_account)
