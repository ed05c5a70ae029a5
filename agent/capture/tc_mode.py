"""The ebpf-tc capture mode: bpf/capture_tc.c on tc ingress of each local pod's node-side veth.

``TcCapture`` implements the ``Capture`` interface (agent.capture.interface):
  - ``start()``: compile and load the program in a short-lived child (agent.bpf.loader: bcc
    and libLLVM never enter the agent), keep its program and map fds, fill tcpmesh_tc_cidrs
    (capture CIDRs, bypass CIDRs, the node's own addresses as bypass /32s), install the fwmark
    rule and local table (agent.capture.steering);
  - ``attach(w)``: the interface the node routes ``w.ip`` through (`ip route get` → oif) gets a
    clsact qdisc and our cls_bpf filter on ingress (direct-action, IPv4, priority/handle below,
    name ``tcpmesh_tc_in``), with ``replace`` so a leftover of a crashed run is swapped in place;
    several workloads behind one interface share one filter;
  - ``origin(sock)``: getsockname() of the accepted socket (agent.capture.transparent);
  - ``stop()``: removes every filter it attached (and the clsact when nothing else is left on it),
    the steering objects, and releases the program.
The proxy's outbound listener must be IP_TRANSPARENT (``listener``): the assigned SYN carries the
original destination, and the SYN-ACK leaves from that foreign address.

``find_leftovers`` / ``cleanup_leftovers`` find and remove, by name and constants, whatever a
crashed run left in a namespace; they need no bcc. Must not import the proxy or telemetry packages.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from agent.bpf import sources
from agent.bpf.counters import read_reason_counters
from agent.bpf.errors import NotLoaded
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import Loaded, LoadRequest, Program, load
from agent.bpf.maps import check_layout
from agent.capture import abi, node_rules, steering
from agent.capture.cidrs import DEFAULT_CAPTURE_CIDRS, lpm_entries
from agent.capture.interface import ListenerRequirements
from agent.capture.node_rules import NodeRules, node_destinations
from agent.capture.meshdsts import ipv4_mesh_cidrs
from agent.capture.netfilter import NetfilterError
from agent.capture.netns import describe, ipr, netlink_call
from agent.capture.origin import Origin
from agent.capture.transparent import TransparentOrigins, lookup_address
from agent.errors import KernelError
from agent.registry.model import Workload

SOURCE_NAME = "capture_tc.c"
PROGRAM = "tcpmesh_tc_in"
FILTER_NAME_PREFIX = "tcpmesh"     # every tc filter tcpmesh makes is named tcpmesh_*
TC_PRIORITY = 0x746D               # 29805: filters with a lower number run first
TC_HANDLE = 1
CLSACT_INGRESS = 0xFFFFFFF2        # ffff:fff2
CLSACT_EGRESS = 0xFFFFFFF3
ETH_P_IP = 0x0800
PROG_SCHED_CLS = 3                 # BPF_PROG_TYPE_SCHED_CLS
CIDRS_MAP = "tcpmesh_tc_cidrs"
COUNTERS_MAP = "tcpmesh_tc_counters"
MAP_LAYOUTS = {CIDRS_MAP: (abi.CidrKey, abi.CidrValue), COUNTERS_MAP: (ctypes.c_int, ctypes.c_uint64)}
DEFAULT_MAX_CONNECTIONS = 65536


def compile_flags(source_dir: Path, listen_address: str, listen_port: int,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS) -> list[str]:
    """The -I/-D flags for capture_tc.c (pure). PROXY_IP is the host-order integer."""
    return [
        *sources.base_cflags(source_dir),
        f"-DPROXY_IP={int(ipaddress.IPv4Address(lookup_address(listen_address)))}u",
        f"-DPROXY_PORT={int(listen_port)}",
        f"-DTCPMESH_MAX_CONNS={int(max_connections)}",
    ]


def cidr_entries(capture: Sequence[str], bypass: Sequence[str], local: frozenset[str]) -> dict[tuple[int, int], int]:
    """The LPM entries: the configured CIDRs, then every node address as a BYPASS /32 (pure)."""
    entries = lpm_entries(capture, bypass)
    for ip in sorted(local):
        entries[(32, abi.ip4_to_net_u32(ip))] = abi.CIDR_BYPASS
    return entries


class TcCapture:
    """One loaded copy of capture_tc.c and the interfaces it is attached to."""

    name = "ebpf-tc"
    listener = ListenerRequirements(transparent=True)
    inbound = None  # no kernel enforcement of STRICT in this mode
    egress = None  # no kernel events of connects outside the mesh

    @property
    def refusals(self) -> NodeRules:
        """The node table (agent.capture.node_rules): it counts the SYNs it resets, per source."""
        return self._node_rules

    def __init__(self, listen_address: str, listen_port: int, state_dir: str, *, netns: str | None = None,
                 capture_cidrs: Sequence[str] = DEFAULT_CAPTURE_CIDRS, bypass_cidrs: Sequence[str] = (),
                 source_dir: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 passthrough_deny: bool = False) -> None:
        self.listen_address = listen_address
        self.listen_port = int(listen_port)
        self.state_dir = state_dir
        self.netns = netns
        self._capture_cidrs = tuple(capture_cidrs)
        self._bypass_cidrs = tuple(bypass_cidrs)
        lpm_entries(self._capture_cidrs, self._bypass_cidrs)  # validate now, not at start()
        # the mesh's /32s once a registry snapshot named them; until then every capture CIDR (the
        # proxy refuses what is not in the mesh: fail closed)
        self._mesh: tuple[str, ...] | None = None
        # policy.outbound_passthrough DENY: a packet-level mode cannot refuse at connect(), so it keeps
        # steering the whole scope and the proxy refuses what is not in the mesh (reset, NR)
        self._passthrough_deny = passthrough_deny
        self.source_dir = Path(source_dir) if source_dir else sources.bpf_dir()
        self.max_connections = max_connections
        self._origins = TransparentOrigins()
        self._loaded: Loaded | None = None
        self._libbpf: Libbpf | None = None
        self._attached: dict[str, tuple[int, str]] = {}  # workload key -> (ifindex, ifname)
        self._node_rules = NodeRules(self.name, netns, refuse_all6=passthrough_deny)  # agent.capture.node_rules
        self._vips4: frozenset[str] = frozenset()  # Service IPv4 addresses: captured even when the node holds them
        self.load_seconds: float | None = None

    # ---- Capture interface ---------------------------------------------------------------------

    def start(self) -> None:
        if self._loaded is not None:
            return
        request = LoadRequest(str(self.source_dir / SOURCE_NAME),
                              tuple(compile_flags(self.source_dir, self.listen_address, self.listen_port,
                                                  self.max_connections)),
                              str(self.state_dir), (Program(PROGRAM, PROG_SCHED_CLS),), (CIDRS_MAP, COUNTERS_MAP))
        loaded = load(request)
        try:
            self._libbpf = Libbpf()
            for name, (key, value) in MAP_LAYOUTS.items():
                check_layout(self._libbpf, loaded.maps[name], name, ctypes.sizeof(key), ctypes.sizeof(value))
            self._loaded = loaded
            self.refresh_local_addresses()
            steering.ensure(self.netns)
        except BaseException:
            self._loaded = None
            loaded.close()
            raise
        self.load_seconds = loaded.compile_seconds + loaded.load_seconds

    def attach(self, workload: Workload) -> None:
        """Our filter on ingress of the interface ``workload.ip`` routes through. Idempotent."""
        self._require_started()
        index, ifname = steering.route_interface(workload.ip, self.netns)
        if self._attached.get(workload.key) == (index, ifname):
            return
        self.refresh_local_addresses()
        if (index, ifname) not in self._attached.values():
            install_filter(self.netns, index, ifname, self._loaded.programs[PROGRAM])
        previous = self._attached.get(workload.key)
        self._attached[workload.key] = (index, ifname)
        if previous is not None:
            self._release(previous)
        self._node_rules.set_interfaces({key: name for key, (_, name) in self._attached.items()})

    def detach(self, workload: Workload) -> None:
        """Stop capturing ``workload``; the filter goes when no attached workload uses its interface."""
        link = self._attached.pop(workload.key, None)
        if link is not None:
            self._release(link)
            self._node_rules.set_interfaces({key: name for key, (_, name) in self._attached.items()})

    def origin(self, sock: socket.socket) -> Origin | None:
        return self._origins.origin(sock)

    def stop(self) -> None:
        errors: list[Exception] = []
        for key in list(self._attached):
            try:
                self._release(self._attached.pop(key))
            except KernelError as exc:
                errors.append(exc)
        try:
            steering.remove(self.netns)
        except KernelError as exc:
            errors.append(exc)
        try:
            self._node_rules.remove()
        except NetfilterError as exc:
            errors.append(exc)
        self.abandon()
        if errors:
            raise errors[0]

    def counters(self) -> dict[str, int]:
        """{reason: total over CPUs}; empty on a partial read or before start()."""
        if self._loaded is None:
            return {}
        return read_reason_counters(self._libbpf, self._loaded.maps[COUNTERS_MAP], abi.TC_REASONS, COUNTERS_MAP) or {}

    # ---- more ----------------------------------------------------------------------------------

    def abandon(self) -> None:
        """Close the agent's descriptors and forget attachments without touching kernel objects —
        what a crash does (attached filters keep the program and its maps alive). stop() ends here."""
        self._attached.clear()
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    def attachments(self) -> dict[str, str]:
        """{workload key: interface}, a snapshot for `doctor` and tests."""
        return {key: ifname for key, (_, ifname) in sorted(self._attached.items())}

    def set_mesh_destinations(self, workloads: Iterable[Workload], services: Iterable[tuple[str, int]] = (),
                              node_ports: Iterable[tuple[str, int]] = ()) -> None:
        """Only the mesh is captured: the IPv4 workload addresses inside the capture CIDRs, each a /32.
        Every other destination is left alone (it leaves from the pod; the proxy never dials it) —
        unless passthrough is DENY: then the whole scope stays steered and the proxy refuses it.
        IPv6 to the mesh is refused and Service IPv4 addresses skip conntrack (agent.capture.node_rules).
        ``node_ports`` are not steered (that would take the node address's other ports too): a pod's SYN to one
        is reset on its node (agent.capture.node_rules), never left to kube-proxy's plaintext DNAT."""
        workloads, services = tuple(workloads), tuple(services)
        self._node_rules.set_mesh((w.ip6 for w in workloads if w.ip6), services, node_ports)
        # a Service address that is also the node's own (kube-proxy IPVS: every ClusterIP on kube-ipvs0)
        self._vips4 = frozenset(node_destinations((), services)[2])
        if not self._passthrough_deny:
            addresses = [w.ip for w in workloads] + [address for address, _ in services]  # a Service: every port
            self._mesh = tuple(ipv4_mesh_cidrs(addresses, self._capture_cidrs, self._bypass_cidrs))
        if self._loaded is not None:
            self.refresh_local_addresses()

    def refresh_local_addresses(self) -> None:
        """Re-read the node's addresses: never captured, and not an origin (swapped whole) — but a
        Service address the node holds (kube-proxy's IPVS mode) is the mesh's."""
        self._require_started()
        local = steering.local_addresses(self.netns) - self._vips4
        capture, bypass = (self._capture_cidrs, self._bypass_cidrs) if self._mesh is None else (self._mesh, ())
        self._write_cidrs(cidr_entries(capture, bypass, local))
        self._origins.local = local

    def _release(self, link: tuple[int, str]) -> None:
        if link not in self._attached.values():
            remove_filters(self.netns, link[0], link[1], PROGRAM)

    def _write_cidrs(self, entries: dict[tuple[int, int], int]) -> None:
        """New entries go in before stale ones come out."""
        fd = self._loaded.maps[CIDRS_MAP]
        wanted = {bytes(abi.CidrKey(prefixlen=p, ip4=ip4)): action for (p, ip4), action in entries.items()}
        for key, action in wanted.items():
            self._libbpf.map_update(fd, key, bytes(abi.CidrValue(action=action)), CIDRS_MAP)
        for key in self._libbpf.map_keys(fd, ctypes.sizeof(abi.CidrKey), CIDRS_MAP):
            if key not in wanted:
                self._libbpf.map_delete(fd, key, CIDRS_MAP)

    def _require_started(self) -> None:
        if self._loaded is None:
            raise NotLoaded("TcCapture.start() has not run (or stop() already did)")


# ---- tc objects, found by name (no bcc needed) ----------------------------------------------------

@dataclass(frozen=True)
class Filter:
    ifindex: int
    ifname: str
    parent: int
    priority: int
    protocol: int
    handle: int
    name: str

    def describe(self, where: str) -> str:
        side = "ingress" if self.parent == CLSACT_INGRESS else "egress"
        return f"tc filter {self.name} on {self.ifname} {side} (pref {self.priority}) in {where}"


def _filters(handle, index: int, ifname: str) -> list[Filter]:
    found = []
    for parent in (CLSACT_INGRESS, CLSACT_EGRESS):
        try:
            msgs = handle.get_filters(index=index, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                continue  # no clsact here, or the interface is gone
            raise
        for msg in msgs:
            options = msg.get_attr("TCA_OPTIONS")
            if msg.get_attr("TCA_KIND") != "bpf" or options is None:
                continue
            found.append(Filter(index, ifname, parent, msg["info"] >> 16, socket.ntohs(msg["info"] & 0xFFFF),
                                msg["handle"], options.get_attr("TCA_BPF_NAME") or ""))
    return found


def _has_clsact(handle, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in handle.get_qdiscs(index))


@netlink_call
def install_filter(netns: str | None, index: int, ifname: str, prog_fd: int, name: str = PROGRAM,
                    prio: int = TC_PRIORITY, protocol: int = ETH_P_IP) -> None:
    """``name`` at (ingress, ``prio``, TC_HANDLE) on one interface, replacing what sits there; other
    filters of the same name at other places (an older version's) are removed."""
    where = describe(netns)
    with ipr(netns) as handle:
        if not _has_clsact(handle, index):
            try:
                handle.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise KernelError("add clsact qdisc", f"{ifname} in {where}", exc.code,
                                      "is another ingress qdisc installed on it?") from exc
        try:
            handle.tc("replace-filter", "bpf", index, TC_HANDLE, fd=prog_fd, name=name, parent=CLSACT_INGRESS,
                      prio=prio, protocol=protocol, direct_action=True)
        except NetlinkError as exc:
            raise KernelError("add tc filter", f"{name} on {ifname} ingress in {where}", exc.code) from exc
        for stale in _filters(handle, index, ifname):  # the same filter of an older run at another place
            if stale.name == name and (stale.parent, stale.priority, stale.handle) != \
                    (CLSACT_INGRESS, prio, TC_HANDLE):
                _delete_filter(handle, stale, where)


def _delete_filter(handle, f: Filter, where: str) -> bool:
    try:
        handle.tc("del-filter", "bpf", f.ifindex, f.handle, parent=f.parent, prio=f.priority, protocol=f.protocol)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise KernelError("delete tc filter", f.describe(where), exc.code) from exc
    return True


@netlink_call
def remove_filters(netns: str | None, index: int, ifname: str, name: str | None = None) -> list[str]:
    """Delete tcpmesh filters (only those called ``name``, if given) on one interface, then its
    clsact if nothing is left on it."""
    where = describe(netns)
    removed = []
    with ipr(netns) as handle:
        if not _link_exists(handle, index):
            return []  # interface gone: its filters went with it
        for f in _filters(handle, index, ifname):
            if (f.name == name if name else f.name.startswith(FILTER_NAME_PREFIX)) and _delete_filter(handle, f, where):
                removed.append(f.describe(where))
        if removed and not _filters(handle, index, ifname) and _has_clsact(handle, index):
            try:
                handle.tc("del", "clsact", index)
                removed.append(f"clsact qdisc on {ifname} in {where}")
            except NetlinkError as exc:
                if exc.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                    raise KernelError("delete clsact qdisc", f"{ifname} in {where}", exc.code) from exc
    return removed


def _link_exists(handle, index: int) -> bool:
    try:
        return bool(handle.get_links(index))
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise


@netlink_call
def find_leftovers(netns: str | None = None) -> list[str]:
    """Every tc filter named tcpmesh* and the steering objects in ``netns`` (None: this one)."""
    where = describe(netns)
    found = []
    with ipr(netns) as handle:
        for link in handle.get_links():
            index, ifname = link["index"], link.get_attr("IFLA_IFNAME")
            found += [f.describe(where) for f in _filters(handle, index, ifname)
                      if f.name.startswith(FILTER_NAME_PREFIX)]
    return found + [f"{item} in {where}" for item in steering.present(netns)] + node_rules.present(netns)


@netlink_call
def cleanup_leftovers(netns: str | None = None, dry_run: bool = False) -> list[str]:
    """Remove every tc filter tcpmesh made (and a clsact left empty by that), the fwmark rule and
    the local table in ``netns`` (None: this one). Returns what was removed (``dry_run``: what
    would be, removing nothing); safe to run twice."""
    if dry_run:
        return find_leftovers(netns)
    removed = []
    with ipr(netns) as handle:
        links = [(link["index"], link.get_attr("IFLA_IFNAME")) for link in handle.get_links()]
    for index, ifname in links:
        removed += remove_filters(netns, index, ifname)
    return removed + steering.remove(netns) + node_rules.remove(netns)
