"""The node netns rules the packet-level modes (ebpf-tc, iptables) need besides steering: one nftables
table, ``inet tcpmesh_node``, replaced whole at every change, at priority raw (before conntrack and
kube-proxy's DNAT, so it sees the address the pod dialled), for packets entering from a captured
pod's interface:

- **IPv6 to the mesh is refused.** These modes steer IPv4 only. On a dual-stack node a pod could
  otherwise dial a workload's IPv6 address, or a Service's IPv6 virtual address that kube-proxy
  DNATs to one, and reach it in plaintext past policy and identity (seen succeeding:
  tests/hostile/test_hostile_ipv6_packet_modes.py). The design's rule for an address family the mesh
  does not carry is to refuse it: a SYN to a workload's IPv6 address (any port) or a Service's IPv6
  address and port is answered with a TCP reset. Other IPv6 (outside the mesh, replies, other ports
  of a virtual address) is left alone — unless ``policy.outbound_passthrough`` is DENY: then every
  IPv6 SYN from a captured pod is reset (IPv4 outside the mesh is refused by the proxy; IPv6 never
  reaches it).
- **IPv4 virtual addresses are not tracked.** A captured SYN to a Service's IPv4 address is handed
  to the proxy (tc's bpf_sk_assign, TPROXY) and then met kube-proxy's DNAT in nat/prerouting, which
  rewrote its destination under the proxy's socket: the handshake never completed (ebpf-tc: the
  client timed out; iptables: reset), with nothing recorded. ``notrack`` keeps conntrack, and so
  every NAT rule, off those packets; the proxy sees the address the pod dialled.
- **nodePorts are refused.** These modes cannot steer one port of a node's address, and kube-proxy
  DNATs a nodePort on every local address of every node to an endpoint, in plaintext, past policy
  (seen succeeding: tests/hostile/test_hostile_ipv6_packet_modes.py). A SYN to a (node address,
  nodePort) pair of the registry, either family, is reset.

- **Every reset is counted, per source.** A refused SYN jumps to chain ``refuse4``/``refuse6``, which
  counts it in the dynamic set ``refused4``/``refused6`` — one element per (source address, destination
  address, port), each with its own counter (``update @set { key counter }``; a kernel whose nftables
  cannot takes the table without counting, said once), gone 10 minutes after its last SYN (at most 65,536; a full
  set counts no more, the SYN is reset all the same) — and resets it. ``read_refusals`` reads both sets
  (``nft -j list set``); agent.telemetry.refusals names the pod, the reason (nodePort, hostPort, IPv6)
  and the fix. The jump is the verdict of the rules that reset: a connection that is not refused
  passes the same matches as before.

    table inet tcpmesh_node { set refused4; set refused6; set pod_ifaces; set mesh6; set mesh6_svc; set vips4;
                              set node_ports4; set node_ports6; chain prerouting { ... }; chain refuse4; chain refuse6 }

The table is updated in place (one transaction: every object declared, the chains and the data sets
flushed and filled again), so the counting sets keep their counts across changes; a table another
version left whose sets differ is replaced whole instead (``ruleset(..., replace=True)``).

No IPv6 destination, no IPv4 virtual address, no nodePort and passthrough ALLOW: no table. Where the
table cannot be installed (no ``nft`` binary, a kernel without nf_tables) while the registry has IPv6
destinations or nodePorts: NetfilterError naming the count and both fixes — the snapshot is refused
(at start the agent does not run) rather than leaving them open; for the other rules alone an error
is logged once (a node without nft still runs its IPv4 mesh). ``ruleset`` is pure; the class runs
``nft`` in the node netns.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Iterable, Mapping

from agent.capture.netfilter import NetfilterError
from agent.capture.netns import describe, run

FAMILY = "inet"
TABLE = "tcpmesh_node"
REFUSED_SETS = ("refused4", "refused6")  # (source, destination, port) → SYNs reset, IPv4 and IPv6
REFUSED_SIZE = 65536      # elements per counting set; beyond, SYNs are reset but not counted
REFUSED_TIMEOUT = "10m"   # an element goes this long after its last SYN (read every few seconds before)
DATA_SETS = ("pod_ifaces", "mesh6", "mesh6_svc", "vips4", "node_ports4", "node_ports6")
CHAINS = ("prerouting", "refuse4", "refuse6")

log = logging.getLogger("tcpmesh.capture")

Mesh = tuple[tuple[str, ...], tuple[tuple[str, int], ...], tuple[str, ...]]


def node_destinations(addresses: Iterable[str], frontends: Iterable[tuple[str, int]]) -> Mesh:
    """(workload IPv6 addresses, Service (IPv6 address, port) pairs, Service IPv4 addresses), sorted and
    unique (pure). ``addresses``: workload addresses of either family; ``frontends``: Service pairs."""
    frontends = tuple(frontends)

    def is6(text: str) -> bool:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)

    return (tuple(sorted({a for a in addresses if is6(a)})),
            tuple(sorted({(a, int(p)) for a, p in frontends if is6(a)})),
            tuple(sorted({a for a, _ in frontends if not is6(a)}, key=lambda a: int(ipaddress.IPv4Address(a)))))


def shared_interfaces(by_workload: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{interface: the workloads behind it, sorted} for every interface more than one workload uses (pure)."""
    behind: dict[str, list[str]] = {}
    for key, ifname in by_workload.items():
        behind.setdefault(ifname, []).append(key)
    return {ifname: tuple(sorted(keys)) for ifname, keys in sorted(behind.items()) if len(keys) > 1}


NodePorts = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def node_port_pairs(node_ports: Iterable[tuple[str, int]]) -> NodePorts:
    """(IPv4 (node address, nodePort) pairs, IPv6 ones), sorted and unique (pure)."""
    pairs = {(str(ipaddress.ip_address(a)), int(p)) for a, p in node_ports}
    ipv4 = sorted(((a, p) for a, p in pairs if ":" not in a),
                  key=lambda pair: (int(ipaddress.ip_address(pair[0])), pair[1]))
    return tuple(ipv4), tuple(sorted((a, p) for a, p in pairs if ":" in a))


def ruleset(ifaces: Iterable[str], mesh: Mesh, refuse_all6: bool = False, node_ports: NodePorts = ((), ()),
            replace: bool = False, count: bool = True) -> str:
    """One ``nft -f`` transaction bringing the table to this state (pure): in place — every object declared
    (a no-op for those that exist), the chains and data sets flushed and filled, the counting sets kept — or,
    ``replace``, the table deleted and made anew. Empty sets are left without elements.
    ``refuse_all6`` (policy.outbound_passthrough DENY): every IPv6 SYN from a pod interface is reset.
    ``node_ports``: (node address, nodePort) pairs, reset — these modes cannot steer one port of an address.
    ``count``: each reset counted per (source, destination, port) first (a kernel without nftables' dynamic sets
    with counters takes the table without it)."""
    def elements(items: list[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    def joined(pairs: Iterable[tuple[str, int]]) -> list[str]:
        return [f"{address} . {port}" for address, port in pairs]

    addresses6, frontends6, vips4 = mesh
    names = [f'"{name}"' for name in sorted(set(ifaces))]
    types = {"pod_ifaces": "ifname", "mesh6": "ipv6_addr", "mesh6_svc": "ipv6_addr . inet_service",
             "vips4": "ipv4_addr", "node_ports4": "ipv4_addr . inet_service", "node_ports6": "ipv6_addr . inet_service"}
    content = {"pod_ifaces": names, "mesh6": list(addresses6), "mesh6_svc": joined(frontends6), "vips4": list(vips4),
               "node_ports4": joined(node_ports[0]), "node_ports6": joined(node_ports[1])}
    counting = "".join(f"  set {name} {{ type {kind} . {kind} . inet_service; size {REFUSED_SIZE}; flags dynamic,timeout; "
                       f"timeout {REFUSED_TIMEOUT}; }}\n"
                       for name, kind in zip(REFUSED_SETS, ("ipv4_addr", "ipv6_addr"))) if count else ""
    declared = (f"table {FAMILY} {TABLE} {{\n" + counting
                + "".join(f"  set {name} {{ type {types[name]}; }}\n" for name in DATA_SETS)
                + "  chain prerouting { type filter hook prerouting priority raw; policy accept; }\n"
                + "  chain refuse4 { }\n  chain refuse6 { }\n}\n")
    flushed = "".join(f"flush chain {FAMILY} {TABLE} {name}\n" for name in CHAINS) + \
        "".join(f"flush set {FAMILY} {TABLE} {name}\n" for name in DATA_SETS)
    syn = "iifname @pod_ifaces tcp flags & (syn | ack) == syn"
    filled = (f"table {FAMILY} {TABLE} {{\n"
              + "".join(f"  set {name} {{ type {types[name]};{elements(content[name])} }}\n" for name in DATA_SETS)
              + "  chain refuse4 {\n" + ("    update @refused4 { ip saddr . ip daddr . tcp dport counter }\n" if count else "")
              + "    reject with tcp reset\n  }\n"
              + "  chain refuse6 {\n" + ("    update @refused6 { ip6 saddr . ip6 daddr . tcp dport counter }\n" if count else "")
              + "    reject with tcp reset\n  }\n"
              + f"  chain prerouting {{\n"
              f"    iifname @pod_ifaces ip daddr @vips4 notrack\n"
              f"    {syn} ip6 daddr @mesh6 jump refuse6\n"
              f"    {syn} ip6 daddr . tcp dport @mesh6_svc jump refuse6\n"
              f"    {syn} ip daddr . tcp dport @node_ports4 jump refuse4\n"
              f"    {syn} ip6 daddr . tcp dport @node_ports6 jump refuse6\n"
              + (f"    {syn} meta nfproto ipv6 jump refuse6\n" if refuse_all6 else "")
              + "  }\n}\n")
    if replace:
        return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + declared + filled
    return declared + flushed + filled


Refusals = dict[tuple[str, str, int], int]


def parse_refusals(text: str) -> Refusals:
    """Pure: {(source address, destination address, port): SYNs reset} of one ``nft -j list set`` of a counting
    set. ValueError for output that is not such a listing."""
    found: Refusals = {}
    for item in json.loads(text).get("nftables", []):
        for entry in (item.get("set") or {}).get("elem", []):
            element = entry.get("elem", entry) if isinstance(entry, dict) else entry
            if not isinstance(element, dict) or "counter" not in element:
                continue  # an element without its counter (cannot be: the set's elements all carry one)
            source, destination, port = element["val"]["concat"]
            key = (str(ipaddress.ip_address(source)), str(ipaddress.ip_address(destination)), int(port))
            found[key] = found.get(key, 0) + int(element["counter"]["packets"])
    return found


class NodeRules:
    """The node's table, kept in step with the captured interfaces and the mesh."""

    def __init__(self, mode: str, netns: str | None = None, refuse_all6: bool = False) -> None:
        self.mode = mode
        self.netns = netns
        self.refuse_all6 = refuse_all6  # policy.outbound_passthrough DENY: IPv6 outside the mesh is refused too
        self._ifaces: frozenset[str] = frozenset()
        self._mesh: Mesh = ((), (), ())
        self._node_ports: NodePorts = ((), ())
        self._installed: str | None = None
        self.counting = True  # resets counted per source (False: this kernel's nftables cannot; said once)
        self._warned = False
        self._shared_warned: dict[str, tuple[str, ...]] = {}  # interface → the workloads last said to share it

    def set_interfaces(self, by_workload: Mapping[str, str]) -> None:
        """{workload key: the node interface it is routed through}; an interface several workloads share
        (a bridge network) is said once, loudly: these modes cannot tell its pods apart."""
        for ifname, keys in shared_interfaces(by_workload).items():
            if self._shared_warned.get(ifname) != keys:
                self._shared_warned[ifname] = keys
                log.warning("capture mode %s: workloads %s share the node interface %s (a bridge network). This mode "
                            "names a connection's source by its address only, and on a bridge a pod can answer ARP "
                            "for a neighbour's address and be taken for it by the outbound proxy — the neighbour's "
                            "identity, past a DENY naming its own. Use capture.mode ebpf-connect (it also checks the "
                            "client's cgroup), or a CNI that routes each pod to its own interface or drops spoofed "
                            "ARP and addresses (docs/security.md, Known gaps 4)", self.mode, ", ".join(keys), ifname)
        self._ifaces = frozenset(by_workload.values())
        self._apply()

    def set_mesh(self, addresses: Iterable[str], frontends: Iterable[tuple[str, int]],
                 node_ports: Iterable[tuple[str, int]] = ()) -> None:
        self._mesh = node_destinations(addresses, frontends)
        self._node_ports = node_port_pairs(node_ports)
        self._apply()

    def _apply(self) -> None:
        addresses6, frontends6, vips4 = self._mesh
        node_ports = self._node_ports[0] + self._node_ports[1]
        if not addresses6 and not frontends6 and not vips4 and not node_ports and not self.refuse_all6:
            if self._installed is not None:
                self.remove()
            return
        text = ruleset(self._ifaces, self._mesh, self.refuse_all6, self._node_ports, count=self.counting)
        if text == self._installed:
            return
        problem = ""
        try:
            done = run(["nft", "-f", "-"], self.netns, stdin=text)
            if not done.ok:  # a table of another version whose sets differ: replaced whole (its counts go)
                log.info("nftables table %s %s in %s not updated in place (%s): replaced whole", FAMILY, TABLE,
                         describe(self.netns), done.error())
                done = run(["nft", "-f", "-"], self.netns, stdin=ruleset(self._ifaces, self._mesh, self.refuse_all6,
                                                                         self._node_ports, replace=True,
                                                                         count=self.counting))
            if not done.ok and self.counting:  # a kernel without dynamic sets with counters: reset, uncounted
                uncounted = run(["nft", "-f", "-"], self.netns, stdin=ruleset(
                    self._ifaces, self._mesh, self.refuse_all6, self._node_ports, replace=True, count=False))
                if uncounted.ok:
                    log.warning("capture mode %s: nftables in %s cannot count the connections table %s %s resets "
                                "per source (%s); they are reset all the same, but no metric or log line names the "
                                "pods (tcpmesh_node_refused_connections_total stays empty). A newer kernel/nftables, "
                                "or capture.mode ebpf-connect, shows them", self.mode, describe(self.netns), FAMILY,
                                TABLE, done.error())
                    self.counting = False
                    text = ruleset(self._ifaces, self._mesh, self.refuse_all6, self._node_ports, count=False)
                    done = uncounted
            problem = "" if done.ok else done.error()
        except FileNotFoundError:
            problem = "nft is not installed (not found in PATH)"
        if problem and (addresses6 or frontends6):
            raise NetfilterError(
                f"capture mode {self.mode} steers IPv4 only, and the registry has {len(addresses6)} workload IPv6 "
                f"address(es) and {len(frontends6)} Service IPv6 address:port pair(s) (e.g. "
                f"{(addresses6 or tuple(a for a, _ in frontends6))[0]}); refusing IPv6 needs nftables table "
                f"{FAMILY} {TABLE} in {describe(self.netns)}, which failed: {problem}. Install nftables, or set "
                "capture.mode: ebpf-connect (which meshes IPv6); never left open to plaintext")
        if problem and node_ports:
            raise NetfilterError(
                f"capture mode {self.mode} cannot steer one port of a node's address, and the registry has "
                f"{len(node_ports)} (node address, nodePort) pair(s) (e.g. {node_ports[0][0]}:{node_ports[0][1]}), "
                f"which kube-proxy forwards to the Services' endpoints in plaintext; refusing them needs nftables "
                f"table {FAMILY} {TABLE} in {describe(self.netns)}, which failed: {problem}. Install nftables, or set "
                "capture.mode: ebpf-connect (which meshes nodePorts); never left open to plaintext")
        if problem:   # said loudly, not fatal: a node without IPv6 or nft must still run its IPv4 mesh
            if not self._warned:
                log.error("capture mode %s: nftables table %s %s in %s failed: %s — Services' IPv4 addresses are "
                          "not exempt from kube-proxy's DNAT (their connects fail)%s. Install nftables, or use "
                          "capture.mode ebpf-connect", self.mode, FAMILY, TABLE, describe(self.netns), problem,
                          "; policy.outbound_passthrough DENY cannot refuse IPv6 outside the mesh"
                          if self.refuse_all6 else "")
                self._warned = True
            return
        self._installed = text

    def read_refusals(self) -> Refusals:
        """{(source, destination, port): SYNs reset} as the kernel counts them now (two ``nft -j list set``, ≈ 4 ms
        of CPU each); empty while no table is installed. NetfilterError when a read fails. Any thread."""
        if self._installed is None or not self.counting:
            return {}
        found: Refusals = {}
        for name in REFUSED_SETS:
            done = run(["nft", "-j", "list", "set", FAMILY, TABLE, name], self.netns)
            if not done.ok:
                raise NetfilterError(f"reading the refusal counters (set {name} of {FAMILY} {TABLE} in "
                                     f"{describe(self.netns)}) failed: {done.error()}")
            try:
                found.update(parse_refusals(done.stdout))
            except (ValueError, KeyError, TypeError) as exc:
                raise NetfilterError(f"set {name} of {FAMILY} {TABLE}: nft's listing was not understood ({exc!r})")
        return found

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
