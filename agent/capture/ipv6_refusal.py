"""IPv6 to the mesh is refused in the packet-level modes (ebpf-tc, iptables), which steer IPv4 only.

On a dual-stack node a pod whose IPv4 connections are captured could otherwise dial the same
workloads over IPv6 — a pod's IPv6 address, or a Service's IPv6 virtual address that the node's
kube-proxy DNATs to one — and reach them in plaintext, past policy and identity (seen succeeding:
tests/hostile/test_hostile_ipv6_packet_modes.py). The design's rule for an address family the mesh
does not carry is to refuse it: one nftables table in the node netns, replaced whole at every change,
answers a SYN entering from a captured pod's interface with a TCP reset when its destination is a
workload's IPv6 address (any port) or a Service's IPv6 address and port — at priority raw, before
conntrack and DNAT, so it sees the address the pod dialled. Everything else over IPv6 (destinations
outside the mesh, replies, other ports of a virtual address) is left alone, as for IPv4 — unless
``policy.outbound_passthrough`` is DENY: then every IPv6 SYN from a captured pod is reset (these modes
refuse IPv4 outside the mesh in the proxy; IPv6 never reaches it).

    table ip6 tcpmesh_ipv6 { set pod_ifaces; set mesh6; set mesh6_svc; chain prerouting { ... reject } }

No IPv6 destination in the registry and passthrough ALLOW: no table. IPv6 destinations and no ``nft`` binary (or a kernel
that refuses the table): NetfilterError naming the addresses' count and both fixes — the snapshot is
refused (at start the agent does not run) rather than leaving IPv6 open. ``ruleset`` is pure; the
class runs ``nft`` in the node netns only.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

from agent.capture.netfilter import NetfilterError
from agent.capture.netns import describe, run

FAMILY = "ip6"
TABLE = "tcpmesh_ipv6"

log = logging.getLogger("tcpmesh.capture")


def ipv6_destinations(addresses: Iterable[str], frontends: Iterable[tuple[str, int]]) -> tuple[tuple[str, ...],
                                                                                               tuple[tuple[str, int], ...]]:
    """(workload IPv6 addresses, Service (IPv6 address, port) pairs), sorted and unique (pure)."""
    def is6(text: str) -> bool:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)

    return (tuple(sorted({a for a in addresses if is6(a)})),
            tuple(sorted({(a, int(p)) for a, p in frontends if is6(a)})))


def ruleset(ifaces: Iterable[str], addresses: Iterable[str], frontends: Iterable[tuple[str, int]],
            refuse_all: bool = False) -> str:
    """One ``nft -f`` transaction replacing the table (pure); empty sets are left without elements.
    ``refuse_all`` (policy.outbound_passthrough DENY): every IPv6 SYN from a pod interface is reset."""
    def elements(items: list[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    names = [f'"{name}"' for name in sorted(set(ifaces))]
    pairs = [f"{address} . {port}" for address, port in frontends]
    return (f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
            f"table {FAMILY} {TABLE} {{\n"
            f"  set pod_ifaces {{ type ifname;{elements(names)} }}\n"
            f"  set mesh6 {{ type ipv6_addr;{elements(list(addresses))} }}\n"
            f"  set mesh6_svc {{ type ipv6_addr . inet_service;{elements(pairs)} }}\n"
            f"  chain prerouting {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n"
            f"    iifname @pod_ifaces tcp flags & (syn | ack) == syn ip6 daddr @mesh6 reject with tcp reset\n"
            f"    iifname @pod_ifaces tcp flags & (syn | ack) == syn ip6 daddr . tcp dport @mesh6_svc "
            f"reject with tcp reset\n"
            + ("    iifname @pod_ifaces tcp flags & (syn | ack) == syn reject with tcp reset\n" if refuse_all else "")
            + "  }\n}\n")


class Ipv6Refusal:
    """The node's table, kept in step with the captured interfaces and the mesh's IPv6 destinations."""

    def __init__(self, mode: str, netns: str | None = None, refuse_all: bool = False) -> None:
        self.mode = mode
        self.netns = netns
        self.refuse_all = refuse_all  # policy.outbound_passthrough DENY: IPv6 outside the mesh is refused too
        self._ifaces: frozenset[str] = frozenset()
        self._mesh: tuple[tuple[str, ...], tuple[tuple[str, int], ...]] = ((), ())
        self._installed: str | None = None
        self._warned = False

    def set_interfaces(self, ifaces: Iterable[str]) -> None:
        self._ifaces = frozenset(ifaces)
        self._apply()

    def set_mesh(self, addresses: Iterable[str], frontends: Iterable[tuple[str, int]]) -> None:
        self._mesh = ipv6_destinations(addresses, frontends)
        self._apply()

    def _apply(self) -> None:
        addresses, frontends = self._mesh
        if not addresses and not frontends and not self.refuse_all:
            if self._installed is not None:
                self.remove()
            return
        text = ruleset(self._ifaces, addresses, frontends, self.refuse_all)
        if text == self._installed:
            return
        problem = ""
        try:
            done = run(["nft", "-f", "-"], self.netns, stdin=text)
            problem = "" if done.ok else done.error()
        except FileNotFoundError:
            problem = "nft is not installed (not found in PATH)"
        if problem and not addresses and not frontends:  # passthrough DENY alone: said loudly, not fatal
            if not self._warned:   # (a node without IPv6, or without nft, must still run its IPv4 mesh)
                log.error("capture mode %s: policy.outbound_passthrough DENY cannot refuse IPv6 outside the mesh: "
                          "nftables table %s %s in %s failed: %s. Install nftables, or use capture.mode "
                          "ebpf-connect (which refuses it at connect())", self.mode, FAMILY, TABLE,
                          describe(self.netns), problem)
                self._warned = True
            return
        if problem:
            example = (addresses or tuple(a for a, _ in frontends))[0]
            why = " and policy.outbound_passthrough is DENY" if self.refuse_all else ""
            raise NetfilterError(
                f"capture mode {self.mode} steers IPv4 only, and the registry has {len(addresses)} workload IPv6 "
                f"address(es) and {len(frontends)} Service IPv6 address:port pair(s){why} (e.g. {example}); "
                f"refusing IPv6 needs nftables table "
                f"{FAMILY} {TABLE} in {describe(self.netns)}, which failed: {problem}. Install nftables, or set "
                "capture.mode: ebpf-connect (which meshes IPv6); never left open to plaintext")
        self._installed = text

    def present(self) -> list[str]:
        return present(self.netns)

    def remove(self) -> list[str]:
        self._installed = None
        return remove(self.netns)


def present(netns: str | None = None) -> list[str]:
    """The table, if this netns holds it (a crashed run's too)."""
    try:
        done = run(["nft", "list", "table", FAMILY, TABLE], netns)
    except FileNotFoundError:
        return []
    return [f"nft table {FAMILY} {TABLE} in {describe(netns)}"] if done.ok else []


def remove(netns: str | None = None) -> list[str]:
    found = present(netns)
    if found:
        done = run(["nft", "delete", "table", FAMILY, TABLE], netns)
        if not done.ok:
            raise NetfilterError(f"deleting nft table {FAMILY} {TABLE} in {describe(netns)} failed: {done.error()}")
    return found
