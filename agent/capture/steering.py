"""Node-level plumbing shared by the ebpf-tc and iptables modes and the source return path: marked
packets are delivered locally.

A packet that tc's bpf_sk_assign or netfilter's TPROXY handed to a proxy socket, or a pod's reply to
an inbound leg that borrowed its client's address (agent.capture.source_return), still carries a
foreign destination; without help the node would route (forward) it. Two objects per address family
fix that:

    ip rule  add fwmark MARK/MARK lookup TABLE priority RULE_PRIORITY proto RTPROT      (ip -6 rule: the same)
    ip route add local 0.0.0.0/0 dev lo table TABLE proto RTPROT                     (IPv6: local ::/0)

Every object is recognisable: table and priority 29805 (0x746d, "tm" — the number tcpmesh uses
everywhere), protocol RTPROT, and the mark bit TCPMESH_STEER_MARK of bpf/include/tcpmesh_abi.h.
``ensure`` installs one family's pair, idempotently (tolerates only EEXIST): IPv4 for the capture
modes (they steer IPv4 only), both for the source return path; an IPv6 pair the kernel refuses (IPv6
disabled on lo, no CONFIG_IPV6_MULTIPLE_TABLES) is a KernelError the caller may survive.
``remove`` and ``present`` find both families' objects by those constants, so they work after a
crash. Also: the node's own addresses (never captured) and the interface a pod's address routes
through (where its capture attaches).
Runs in the caller's netns or a named one (agent.capture.netns); must not import bcc.
"""

from __future__ import annotations

import errno
import socket
from pyroute2.netlink.exceptions import NetlinkError

from agent.capture import abi
from agent.capture.netns import describe, ipr, netlink_call
from agent.errors import KernelError

MARK = abi.STEER_MARK
TABLE = 0x746D           # 29805
RULE_PRIORITY = 0x746D   # before main (32766); after local (0) and whatever else sits lower
RTPROT = 116             # protocol tag on the rule and the route (free in iproute2's rt_protos)
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
FAMILIES = (socket.AF_INET, socket.AF_INET6)
_DEFAULT = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
_IP = {socket.AF_INET: "ip", socket.AF_INET6: "ip -6"}


@netlink_call
def ensure(netns: str | None = None, family: int = socket.AF_INET) -> None:
    """Install one family's fwmark rule and local route (idempotent)."""
    where = describe(netns)
    default = _DEFAULT[family]
    with ipr(netns) as handle:
        lo = handle.link_lookup(ifname="lo")
        if not lo:
            raise KernelError("look up interface", f"lo in {where}", errno.ENODEV)
        handle.link("set", index=lo[0], state="up")
        # the rule first: a kernel without policy routing for the family (CONFIG_IP(V6)_MULTIPLE_TABLES=n)
        # refuses it, and must never get the route — it would file `local <everything>` in the main table
        added = not _our_rules(handle, family)
        if added:
            _tolerate_exists("add rule", f"{_IP[family]} rule fwmark {MARK:#x}/{MARK:#x} lookup {TABLE} in {where}",
                             handle.rule, "add", family=family, fwmark=MARK, fwmask=MARK, table=TABLE,
                             priority=RULE_PRIORITY, protocol=RTPROT)
        if not _our_routes(handle, family):
            try:
                _tolerate_exists("add route", f"{_IP[family]} route local {default} dev lo table {TABLE} in {where}",
                                 handle.route, "add", family=family, dst=default, type="local", scope="host",
                                 table=TABLE, oif=lo[0], proto=RTPROT)
            except KernelError:
                if added:  # nothing half-applied
                    _tolerate_missing("delete rule", f"{_IP[family]} rule in {where}", handle.rule, "del",
                                      family=family, priority=RULE_PRIORITY, table=TABLE, fwmark=MARK, fwmask=MARK)
                raise


@netlink_call
def present(netns: str | None = None) -> list[str]:
    """Descriptions of the steering objects found (ours by table/priority, both families), for tests and cleanup."""
    with ipr(netns) as handle:
        return [text for family in FAMILIES
                for text in [_describe_rule(r, family) for r in _our_rules(handle, family)]
                + [_describe_route(family) for _ in _our_routes(handle, family)]]


@netlink_call
def remove(netns: str | None = None) -> list[str]:
    """Delete every steering object of ours, both families; returns what was removed. Safe to repeat."""
    removed = []
    where = describe(netns)
    with ipr(netns) as handle:
        for family in FAMILIES:
            for rule in _our_rules(handle, family):
                what = f"{_describe_rule(rule, family)} in {where}"
                if _tolerate_missing("delete rule", what, handle.rule, "del", family=family,
                                     priority=rule.get_attr("FRA_PRIORITY"), table=TABLE,
                                     fwmark=rule.get_attr("FRA_FWMARK"), fwmask=rule.get_attr("FRA_FWMASK")):
                    removed.append(what)
            for route in _our_routes(handle, family):
                what = f"{_describe_route(family)} in {where}"
                # scope must match: the kernel's delete compares it (ESRCH otherwise)
                if _tolerate_missing("delete route", what, handle.route, "del", family=family, dst=_DEFAULT[family],
                                     type="local", scope="host", table=TABLE, oif=route.get_attr("RTA_OIF")):
                    removed.append(what)
    return removed


@netlink_call
def local_addresses(netns: str | None = None) -> frozenset[str]:
    """Every IPv4 address configured in the namespace (the node itself: never captured)."""
    with ipr(netns) as handle:
        return frozenset(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                         for a in handle.get_addr(family=socket.AF_INET))


@netlink_call
def route_interface(ip: str, netns: str | None = None) -> tuple[int, str]:
    """(ifindex, ifname) the namespace routes ``ip`` through — `ip route get <ip>` → oif.

    Refuses a route through a gateway or to a local address: that is not a pod on this node.
    """
    where = describe(netns)
    with ipr(netns) as handle:
        try:
            routes = handle.route("get", dst=ip)
        except NetlinkError as exc:
            raise KernelError("route get", f"{ip} in {where}", exc.code,
                              "no route to this pod address: is the pod's veth up?") from exc
        route = routes[0]
        index = route.get_attr("RTA_OIF")
        links = handle.get_links(index) if index else []
        name = links[0].get_attr("IFLA_IFNAME") if links else None
        if route["type"] == RTN_LOCAL or name in (None, "lo"):
            raise KernelError("route get", f"{ip} in {where}", detail="the address is local to the node, not a pod's")
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            raise KernelError("route get", f"{ip} in {where}",
                              detail=f"routed via gateway {gateway} on {name}: not a pod of this node "
                                     "(its node-side veth must carry a direct route to it)")
        return index, name


# ---- internals ----------------------------------------------------------------------------------

def _our_rules(handle, family: int) -> list:
    return [r for r in _dump(handle.get_rules, family=family)
            if r.get_attr("FRA_TABLE") == TABLE and r.get_attr("FRA_PRIORITY") == RULE_PRIORITY]


def _our_routes(handle, family: int) -> list:
    return [r for r in _dump(handle.get_routes, family=family, table=TABLE)
            if r.get_attr("RTA_TABLE") == TABLE and r["type"] == RTN_LOCAL and r["dst_len"] == 0]


def _dump(call, **kwargs) -> list:
    """A netlink dump; a family the kernel does not have (no IPv6, no IPv6 policy routing) has no objects."""
    try:
        return list(call(**kwargs))
    except NetlinkError as exc:
        if exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            return []
        raise


def _describe_rule(rule, family: int) -> str:
    return (f"{_IP[family]} rule pref {rule.get_attr('FRA_PRIORITY')} fwmark {rule.get_attr('FRA_FWMARK') or 0:#x}/"
            f"{rule.get_attr('FRA_FWMASK') or 0:#x} lookup {TABLE}")


def _describe_route(family: int) -> str:
    return f"{_IP[family]} route local {_DEFAULT[family]} dev lo table {TABLE}"


def _tolerate_exists(operation: str, target: str, call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise KernelError(operation, target, exc.code) from exc


def _tolerate_missing(operation: str, target: str, call, *args, **kwargs) -> bool:
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ESRCH):
            return False
        raise KernelError(operation, target, exc.code) from exc
    return True
