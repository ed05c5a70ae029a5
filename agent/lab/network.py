"""Realise (and remove) the network of a ``LabPlan``: namespaces, the wire bridge, veths, addresses, routes.

Applies the plan in a fixed order with the idempotent primitives of ``netns_plumbing``, so running it
again on a half-built lab finishes the job. Removal lists /run/netns and deletes every namespace that
``topology.is_lab_netns`` claims for the lab, so it works without the plan or a state file; veths
vanish with their namespaces.
"""

from __future__ import annotations

from agent.lab import netns_plumbing as nl
from agent.lab.topology import POD_GATEWAY, POD_GATEWAY6, WIRE6_PREFIXLEN, WIRE_PREFIXLEN, LabPlan, NodePlan, \
    PodPlan, is_lab_netns


def build_network(plan: LabPlan) -> None:
    nl.ensure_netns(plan.wire_netns)
    nl.set_up(plan.wire_netns, "lo")
    nl.ensure_bridge(plan.wire_netns, plan.bridge)
    for node in plan.nodes:
        _build_node(plan, node)
    for node in plan.nodes:
        for cidr, via in node.routes + node.routes6:
            nl.ensure_route(node.netns, cidr, gateway=via)


def _build_node(plan: LabPlan, node: NodePlan) -> None:
    nl.ensure_netns(node.netns)
    nl.set_up(node.netns, "lo")
    nl.set_sysctl(node.netns, "net.ipv4.ip_forward", "1")
    _dual_stack(node.netns, forwarding=True)
    nl.ensure_veth(node.netns, node.wire_ifname, plan.wire_netns, node.bridge_port)
    nl.set_up(plan.wire_netns, node.bridge_port, master=plan.bridge)
    nl.ensure_address(node.netns, node.wire_ifname, node.wire_address, WIRE_PREFIXLEN)
    nl.ensure_address(node.netns, node.wire_ifname, node.wire_address6, WIRE6_PREFIXLEN)
    nl.set_up(node.netns, node.wire_ifname)
    for pod in node.pods:
        _build_pod(node, pod)


def _build_pod(node: NodePlan, pod: PodPlan) -> None:
    nl.ensure_netns(pod.netns)
    nl.set_up(pod.netns, "lo")
    _dual_stack(pod.netns, forwarding=False)
    nl.ensure_veth(node.netns, pod.node_ifname, pod.netns, pod.ifname)
    # node side: the link-local gateway on every pod veth, and a /32 route to the pod
    nl.ensure_address(node.netns, pod.node_ifname, POD_GATEWAY, 32)
    nl.set_up(node.netns, pod.node_ifname)
    nl.ensure_route(node.netns, f"{pod.ip}/32", ifname=pod.node_ifname)
    nl.ensure_address(node.netns, pod.node_ifname, POD_GATEWAY6, 64)
    nl.ensure_route(node.netns, f"{pod.ip6}/128", ifname=pod.node_ifname)
    # pod side (Calico-style): <ip>/32, a link route to the gateway, default via it
    nl.ensure_address(pod.netns, pod.ifname, pod.ip, 32)
    nl.set_up(pod.netns, pod.ifname)
    nl.ensure_route(pod.netns, f"{POD_GATEWAY}/32", ifname=pod.ifname, scope="link")
    nl.ensure_route(pod.netns, "default", gateway=POD_GATEWAY, ifname=pod.ifname)
    nl.ensure_address(pod.netns, pod.ifname, pod.ip6, 128)
    nl.ensure_route(pod.netns, "default6", gateway=POD_GATEWAY6, ifname=pod.ifname)


def _dual_stack(netns: str, forwarding: bool) -> None:
    """IPv6 on, addresses usable at once (no duplicate address detection: the lab owns every address),
    and forwarding on a node. Set before the namespace's interfaces exist: they inherit ``default``."""
    for scope in ("all", "default"):
        nl.set_sysctl(netns, f"net.ipv6.conf.{scope}.disable_ipv6", "0")
        nl.set_sysctl(netns, f"net.ipv6.conf.{scope}.accept_dad", "0")
    if forwarding:
        nl.set_sysctl(netns, "net.ipv6.conf.all.forwarding", "1")


def lab_netns_present(lab: str) -> list[str]:
    """The namespaces of lab ``lab`` that exist right now, found by listing /run/netns."""
    return [name for name in nl.list_netns() if is_lab_netns(lab, name)]


def remove_network(lab: str) -> list[str]:
    """Remove every namespace of lab ``lab`` (pods, then nodes, then the wire). Returns the removed names."""
    present = lab_netns_present(lab)
    order = sorted(present, key=lambda name: (name.endswith("-wire"), "-node" in name, name))
    return [name for name in order if nl.remove_netns(name)]
