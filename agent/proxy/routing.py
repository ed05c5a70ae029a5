"""Where a captured connection goes: pure decisions over a registry snapshot.

Outbound: from the client's address and its original destination, decide mesh tunnel (to which
node, expecting which identity) or refusal. There is no passthrough: the agent never dials a
destination outside the mesh on a pod's behalf (the capture leaves such connects alone, so they
leave from the pod itself; docs/security.md). A captured connection to a destination that is not a
workload of the registry — the kernel's mesh map and the registry disagreeing for a moment, or a
new maps directory before the first snapshot — is refused.
A Service virtual address and port resolves to one ready endpoint (agent.proxy.balancer) dialled
on the Service's target port; no ready endpoint is a refusal with UH.
Inbound: whether a CONNECT names a workload of this node served under the identity the client asked
for by SNI, and which Service the client dialled (``dialled_service``: the CONNECT's claim, taken
only when this node's registry has that Service with the destination workload as an endpoint).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.identity.spiffe import SpiffeId
from agent.connection import flow as F
from agent.proxy.balancer import RoundRobin
from agent.registry.model import Registry, Service, Workload


class RouteKind(enum.Enum):
    MESH = "mesh"
    REJECT = "reject"


@dataclass(frozen=True)
class OutboundRoute:
    kind: RouteKind
    source: Workload | None
    destination: Workload | None = None
    tunnel_address: tuple[str, int] | None = None  # the destination node's inbound proxy
    flag: str = F.FLAG_NONE
    reason: str = ""
    service: Service | None = None  # the Service whose virtual address was dialled
    target_port: int = 0  # the port the destination workload is dialled on (the Service's target port)
    host_port: bool = False  # a workload's hostPort at its node's address was dialled (dialled on target_port)


def route_outbound(registry: Registry, node_name: str, client_ip: str, dest_ip: str, dest_port: int,
                   inbound_port: int, balancer: RoundRobin | None = None) -> OutboundRoute:
    """A Service address and port resolves to one ready endpoint (``balancer``), dialled on the
    target port; policy and secure naming then apply to that endpoint's identity."""
    source = registry.by_ip(client_ip)
    if source is None or source.node != node_name:
        return OutboundRoute(RouteKind.REJECT, source, flag=F.FLAG_NO_IDENTITY,
                             reason=f"client {client_ip} is not a workload of node {node_name} in the registry")
    destination = registry.by_ip(dest_ip)
    service = None
    target_port = dest_port
    host_port = None
    if destination is None:
        frontend = registry.service_at(dest_ip, dest_port)
        if frontend is not None:
            service, target_port, ready = frontend
            destination = (balancer or RoundRobin()).pick(service.key, ready)
            if destination is None:
                return OutboundRoute(RouteKind.REJECT, source, flag=F.FLAG_NO_HEALTHY_UPSTREAM, service=service,
                                     reason=f"service {service.key} ({dest_ip}:{dest_port}) has no ready endpoint")
    if destination is None:
        host_port = registry.host_port_at(dest_ip, dest_port)  # a pod's hostPort at its node's address
        if host_port is not None:
            destination, target_port = host_port
    if destination is None:
        return OutboundRoute(RouteKind.REJECT, source, flag=F.FLAG_NO_ROUTE,
                             reason=f"{dest_ip}:{dest_port} is not in the mesh; tcpmesh never dials a destination "
                                    "outside the mesh for a pod (the capture lets such connects leave from the pod "
                                    "itself once it knows the registry)")
    node = registry.node_of(destination)
    if node is None:
        return OutboundRoute(RouteKind.REJECT, source, destination, flag=F.FLAG_NO_ROUTE, service=service,
                             reason=f"destination {destination.key} runs on unknown node {destination.node!r}")
    return OutboundRoute(RouteKind.MESH, source, destination, (node.address, inbound_port), service=service,
                         target_port=target_port, host_port=host_port is not None)


def route_without_origin(registry: Registry, node_name: str, client: tuple[str, int],
                         local: tuple[str, int]) -> OutboundRoute:
    """A connection at the outbound port the capture has no origin record for (refused, NR): what is known —
    no record for this connection, ``client`` → ``local`` — and what it most likely means, by who the client is.

    Only this node's pods are captured, so a client that is no workload of this node dialled the port directly.
    A pod of this node most likely did the same (its connect to the outbound address is left alone, counted
    ``to_redirect``); else, with ebpf-connect, its record was lost between its connect and the proxy's accept."""
    where = f"no origin record for {client[0]}:{client[1]} → {local[0]}:{local[1]}"
    source = registry.by_ip(client[0])
    if source is None or source.node != node_name:
        who = f"{source.key}, a workload of node {source.node}" if source is not None else "in no registry entry"
        return OutboundRoute(RouteKind.REJECT, None, flag=F.FLAG_NO_ROUTE, reason=(
            f"{where}: {client[0]} is no workload of node {node_name} ({who}) and only this node's pods are "
            "captured, so it dialled the outbound port directly; connect to the destination itself (a meshed "
            "pod's connection is steered here by the capture)"))
    return OutboundRoute(RouteKind.REJECT, source, flag=F.FLAG_NO_ROUTE, reason=(
        f"{where} ({source.key}, a workload of this node). Most likely {source.key} dialled the outbound port "
        "itself, not a mesh destination — such connects are left alone and counted as to_redirect in "
        "tcpmesh_capture_events_total; connect to the destination instead. Else (ebpf-connect) its record was lost "
        "between connect and accept: the connection waited over 30 s in the proxy's accept queue (the hand-over "
        "slot was reused: handover_reclaimed), or the record maps were full under load (slot_taken, "
        "handover_slot_taken rising) — docs/capture-connect.md"))


@dataclass(frozen=True)
class InboundTarget:
    workload: Workload | None
    reason: str = ""


def route_inbound(registry: Registry, node_name: str, dest_ip: str, served: SpiffeId | None) -> InboundTarget:
    """``served`` is the identity whose certificate the tunnel's TLS handshake presented (chosen by SNI)."""
    workload = registry.by_ip(dest_ip)
    if workload is None or workload.node != node_name:
        return InboundTarget(None, f"{dest_ip} is not a workload of node {node_name}")
    if workload.spiffe_id != served:
        return InboundTarget(None, f"{dest_ip} is {workload.spiffe_id.uri}, but the client asked for "
                                   f"{served.uri if served else 'no identity'}")
    return InboundTarget(workload)


def dialled_service(registry: Registry, claimed: str, destination: Workload) -> Service | None:
    """The Service the client node says it dialled (the OPEN's SERVICE TLV), if this registry agrees:
    a Service of that namespace/name with ``destination`` among its endpoints (ready or not: a
    connection may open as the endpoint turns not ready). Attribution only, like the source address:
    anything else — no claim, an unknown Service, a workload that is not its endpoint — is None, and
    the destination's records say "unknown"."""
    service = registry.service(claimed) if claimed else None
    if service is None or destination.key not in {e.workload for e in service.endpoints}:
        return None
    return service
