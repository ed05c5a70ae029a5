"""Immutable registry snapshots: workloads (pods) and the nodes that host them.

Pure data and lookups; the data path reads one snapshot at a time and the control plane swaps in a
new one atomically. Imports nothing from the outside world.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from agent.identity.spiffe import SpiffeId


@dataclass(frozen=True)
class Node:
    name: str
    address: str  # where other nodes reach this node's inbound proxy


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    ip: str
    node: str
    cgroup: str | None = None  # cgroup v2 directory of the pod; needed only on its own node
    trust_domain: str = ""

    @functools.cached_property  # validated once, not on each of the data path's several reads per connection
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        """Unique name of the workload across the mesh: ``namespace/name``."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Registry:
    trust_domain: str
    nodes: Mapping[str, Node] = field(default_factory=dict)
    workloads: tuple[Workload, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))
        object.__setattr__(self, "_by_ip", MappingProxyType({w.ip: w for w in self.workloads}))

    @classmethod
    def build(cls, trust_domain: str, nodes: Iterable[Node], workloads: Iterable[Workload]) -> "Registry":
        return cls(trust_domain, {n.name: n for n in nodes}, tuple(workloads))

    def by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)  # type: ignore[attr-defined]

    def local(self, node_name: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node_name)

    def node_of(self, workload: Workload) -> Node | None:
        return self.nodes.get(workload.node)

    def identities_on(self, node_name: str) -> frozenset[SpiffeId]:
        return frozenset(w.spiffe_id for w in self.local(node_name))


def is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
