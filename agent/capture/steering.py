"""Node-level plumbing shared by the ebpf-tc and iptables modes: marked packets are delivered locally.

A packet that tc's bpf_sk_assign or netfilter's TPROXY handed to a proxy socket still carries a
foreign destination; without help the node would route (forward) it. Two objects fix that:

    ip rule  add fwmark MARK/MARK lookup TABLE priority RULE_PRIORITY proto RTPROT
    ip route add local 0.0.0.0/0 dev lo table TABLE proto RTPROT

Every object is recognisable: table and priority 29805 (0x746d, "tm" — the number tcpmesh uses
everywhere), protocol RTPROT, and the mark bit TCPMESH_STEER_MARK of bpf/include/tcpmesh_abi.h.
``ensure`` is idempotent (tolerates only EEXIST); ``remove`` and ``present`` find the objects by
those constants, so they work after a crash. Also: the node's own addresses (never captured) and
the interface a pod's address routes through (where its capture attaches).
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


@netlink_call
def ensure(netns: str | None = None) -> None:
    """Install the fwmark rule and the local route (idempotent)."""
    where = describe(netns)
    with ipr(netns) as handle:
        lo = handle.link_lookup(ifname="lo")
        if not lo:
            raise KernelError("look up interface", f"lo in {where}", errno.ENODEV)
        handle.link("set", index=lo[0], state="up")
        if not _our_routes(handle):
            _tolerate_exists("add route", f"local 0.0.0.0/0 dev lo table {TABLE} in {where}", handle.route, "add",
                             dst="0.0.0.0/0", type="local", scope="host", table=TABLE, oif=lo[0], proto=RTPROT)
        if not _our_rules(handle):
            _tolerate_exists("add rule", f"fwmark {MARK:#x}/{MARK:#x} lookup {TABLE} in {where}", handle.rule, "add",
                             family=socket.AF_INET, fwmark=MARK, fwmask=MARK, table=TABLE,
                             priority=RULE_PRIORITY, protocol=RTPROT)


@netlink_call
def present(netns: str | None = None) -> list[str]:
    """Descriptions of the steering objects found (ours by table/priority), for tests and cleanup."""
    with ipr(netns) as handle:
        return [_describe_rule(r) for r in _our_rules(handle)] + [_describe_route(r) for r in _our_routes(handle)]


@netlink_call
def remove(netns: str | None = None) -> list[str]:
    """Delete every steering object of ours; returns what was removed. Safe to repeat."""
    removed = []
    where = describe(netns)
    with ipr(netns) as handle:
        for rule in _our_rules(handle):
            what = f"{_describe_rule(rule)} in {where}"
            if _tolerate_missing("delete rule", what, handle.rule, "del", family=socket.AF_INET,
                                 priority=rule.get_attr("FRA_PRIORITY"), table=TABLE,
                                 fwmark=rule.get_attr("FRA_FWMARK"), fwmask=rule.get_attr("FRA_FWMASK")):
                removed.append(what)
        for route in _our_routes(handle):
            what = f"{_describe_route(route)} in {where}"
            # scope must match: the kernel's delete compares it (ESRCH otherwise)
            if _tolerate_missing("delete route", what, handle.route, "del", dst="0.0.0.0/0", type="local",
                                 scope="host", table=TABLE, oif=route.get_attr("RTA_OIF")):
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

def _our_rules(handle) -> list:
    return [r for r in handle.get_rules(family=socket.AF_INET)
            if r.get_attr("FRA_TABLE") == TABLE and r.get_attr("FRA_PRIORITY") == RULE_PRIORITY]


def _our_routes(handle) -> list:
    return [r for r in handle.get_routes(family=socket.AF_INET, table=TABLE)
            if r.get_attr("RTA_TABLE") == TABLE and r["type"] == RTN_LOCAL and r["dst_len"] == 0]


def _describe_rule(rule) -> str:
    return (f"ip rule pref {rule.get_attr('FRA_PRIORITY')} fwmark {rule.get_attr('FRA_FWMARK') or 0:#x}/"
            f"{rule.get_attr('FRA_FWMASK') or 0:#x} lookup {TABLE}")


def _describe_route(route) -> str:
    return f"ip route local 0.0.0.0/0 dev lo table {TABLE}"


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
