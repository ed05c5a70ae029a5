"""Immutable registry snapshots: workloads (pods), the nodes that host them, and Services.

A Service (Kubernetes' meaning) is virtual addresses and ports in front of endpoints: workloads,
each ready or not. Connects to a Service address and port are captured like pod addresses; the
outbound proxy picks a ready endpoint (agent.proxy.balancer) and tunnels to it.

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
    # the node's other addresses (ExternalIP, a second InternalIP, IPv6 ones; on its own agent, every local
    # address): kube-proxy answers a nodePort on each of them too, so each is a nodePort frontend
    other_addresses: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the node answers a nodePort on: ``address``, then the others."""
        return (self.address, *(a for a in self.other_addresses if a != self.address))


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    ip: str
    node: str
    cgroup: str | None = None  # cgroup v2 directory of the pod; needed only on its own node
    trust_domain: str = ""
    ip6: str | None = None     # its IPv6 address (dual stack), canonical text; None: IPv4 only
    # (hostPort, container port) pairs: the CNI portmap plugin DNATs its node's addresses:hostPort to it
    host_ports: tuple[ServicePort, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the workload is reached at: ip, then ip6 if it has one."""
        return (self.ip, self.ip6) if self.ip6 else (self.ip,)

    @functools.cached_property  # validated once, not on each of the data path's several reads per connection
    def spiffe_id(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        """Unique name of the workload across the mesh: ``namespace/name``."""
        return f"{self.namespace}/{self.name}"


CLUSTER_DOMAIN = "cluster.local"  # Kubernetes' default; the host part of destination_service


@dataclass(frozen=True)
class ServicePort:
    port: int         # what clients dial on the virtual address
    target_port: int  # what the chosen endpoint serves on


@dataclass(frozen=True)
class Endpoint:
    workload: str      # namespace/name of a workload of the registry
    ready: bool = True  # only ready endpoints receive new connections; open ones are never cut


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    addresses: tuple[str, ...]  # virtual addresses (ClusterIPs), IPv4 and/or IPv6
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    node_ports: tuple[ServicePort, ...] = ()  # (nodePort, target port): reached at every node's address

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def host(self) -> str:
        """Istio's ``destination_service``: ``name.namespace.svc.cluster.local``."""
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    def target_port(self, port: int) -> int | None:
        for p in self.ports:
            if p.port == port:
                return p.target_port
        return None


@dataclass(frozen=True)
class Registry:
    trust_domain: str
    nodes: Mapping[str, Node] = field(default_factory=dict)
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))
        object.__setattr__(self, "_by_ip", MappingProxyType({ip: w for w in self.workloads for ip in w.addresses}))
        by_key = {w.key: w for w in self.workloads}
        # (address, port) -> (service, target port, ready endpoint workloads): resolved once per snapshot
        frontends: dict[tuple[str, int], tuple[Service, int, tuple[Workload, ...]]] = {}
        node_ports: dict[tuple[str, int], tuple[Service, int, tuple[Workload, ...]]] = {}
        for service in self.services:
            ready = tuple(by_key[e.workload] for e in service.endpoints if e.ready and e.workload in by_key)
            for address in service.addresses:
                for port in service.ports:
                    frontends[(address, port.port)] = (service, port.target_port, ready)
            for node in self.nodes.values():  # kube-proxy answers a nodePort on every address of every node
                for address in node.addresses:
                    for port in service.node_ports:
                        node_ports[(address, port.port)] = (service, port.target_port, ready)
        host_ports: dict[tuple[str, int], tuple[Workload, int]] = {}
        for workload in self.workloads:  # portmap answers a hostPort on every address of the pod's own node
            node = self.nodes.get(workload.node)
            for port in workload.host_ports if node is not None else ():
                for address in node.addresses:
                    host_ports[(address, port.port)] = (workload, port.target_port)
        object.__setattr__(self, "_virtual", tuple(frontends))
        object.__setattr__(self, "_node_ports", tuple(dict.fromkeys([*node_ports, *host_ports])))
        object.__setattr__(self, "_frontends", MappingProxyType({**node_ports, **frontends}))
        object.__setattr__(self, "_host_ports", MappingProxyType(host_ports))

    @classmethod
    def build(cls, trust_domain: str, nodes: Iterable[Node], workloads: Iterable[Workload],
              services: Iterable[Service] = ()) -> "Registry":
        return cls(trust_domain, {n.name: n for n in nodes}, tuple(workloads), tuple(services))

    def by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)  # type: ignore[attr-defined]

    def service_at(self, ip: str, port: int) -> tuple[Service, int, tuple[Workload, ...]] | None:
        """The Service whose virtual address and port this is: (service, target port, ready endpoints)."""
        return self._frontends.get((ip, port))  # type: ignore[attr-defined]

    def service(self, key: str) -> Service | None:
        """The Service ``namespace/name``, or None."""
        return next((s for s in self.services if s.key == key), None)

    def service_frontends(self) -> tuple[tuple[str, int], ...]:
        """Every (virtual address, port) of every Service: what the capture must treat as the mesh."""
        return self._virtual  # type: ignore[attr-defined]

    def node_port_frontends(self) -> tuple[tuple[str, int], ...]:
        """Every (node address, nodePort) of every Service, and every (node address, hostPort) of a workload
        on it: the mesh too, but only that port of a node's address (the packet-level modes, which steer whole
        addresses, cannot take them)."""
        return self._node_ports  # type: ignore[attr-defined]

    def host_port_at(self, ip: str, port: int) -> tuple[Workload, int] | None:
        """The workload whose hostPort this (node address, port) is, and its container port."""
        return self._host_ports.get((ip, port))  # type: ignore[attr-defined]

    def with_node_addresses(self, node_name: str, addresses: Iterable[str]) -> "Registry":
        """This snapshot with ``addresses`` added to node ``node_name``'s other addresses (its agent's view:
        every local address of its node answers a nodePort); itself when nothing is added. A Service's or a
        workload's address is not taken (kube-proxy's IPVS mode holds every ClusterIP on the node)."""
        node = self.nodes.get(node_name)
        if node is None:
            return self
        taken = {a for s in self.services for a in s.addresses} | set(self._by_ip)  # type: ignore[attr-defined]
        more = tuple(a for a in dict.fromkeys(addresses) if a not in node.addresses and a not in taken)
        if not more:
            return self
        nodes = {**self.nodes, node_name: Node(node.name, node.address, node.other_addresses + more)}
        return Registry(self.trust_domain, nodes, self.workloads, self.services)

    def local(self, node_name: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node_name)

    def node_of(self, workload: Workload) -> Node | None:
        return self.nodes.get(workload.node)

    def identities_on(self, node_name: str) -> frozenset[SpiffeId]:
        return frozenset(w.spiffe_id for w in self.local(node_name))


def ipv6_text(text: object) -> str | None:
    """The canonical text of an IPv6 address (what the kernel's records parse to), or None."""
    try:
        address = ipaddress.ip_address(str(text))
    except ValueError:
        return None
    return str(address) if isinstance(address, ipaddress.IPv6Address) else None


def is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
