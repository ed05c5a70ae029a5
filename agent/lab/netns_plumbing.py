"""Idempotent network-namespace plumbing primitives on pyroute2: netns, bridge, veth, address, route, sysctl.

Every ``ensure_*`` call either creates the object or finds it already there; it tolerates only the
named errno that means "already exists" (EEXIST) and re-raises anything else as a ``KernelError``
naming the operation, the object and the namespace. ``remove_netns`` tolerates only ENOENT.
All calls take a namespace name and open ``IPRoute(netns=…)``; nothing here touches the root netns.

Knows nothing about labs: ``network`` maps a ``LabPlan`` onto these calls.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import IPRoute, netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import KernelError
from agent.lab.nsenter import NETNS_RUN_DIR, netns_path, run_in_netns


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def ensure_netns(name: str) -> None:
    if netns_exists(name):
        return
    try:
        pyroute2_netns.create(name)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise KernelError("create netns", name, exc.errno) from exc
    if not netns_exists(name):
        raise KernelError("create netns", name, detail=f"{netns_path(name)} did not appear")


def remove_netns(name: str) -> bool:
    """Unmount and unlink /run/netns/<name>; interfaces inside go when the last user leaves. False if absent."""
    try:
        pyroute2_netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KernelError("remove netns", name, exc.errno) from exc
    return True


@contextmanager
def ipr(netns: str) -> Iterator[IPRoute]:
    """An IPRoute bound to ``netns`` (never the root namespace: the name is required)."""
    if not netns:
        raise ValueError("a namespace name is required: the lab never touches the root network namespace")
    with IPRoute(netns=netns) as handle:
        yield handle


def link_index(handle: IPRoute, ifname: str) -> int | None:
    found = handle.link_lookup(ifname=ifname)
    return found[0] if found else None


def _index(handle: IPRoute, netns: str, ifname: str) -> int:
    index = link_index(handle, ifname)
    if index is None:
        raise KernelError("look up interface", f"{ifname} in netns {netns}", errno.ENODEV)
    return index


def _tolerate_exists(operation: str, target: str, call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise KernelError(operation, target, exc.code) from exc


def ensure_bridge(netns: str, ifname: str) -> None:
    with ipr(netns) as handle:
        if link_index(handle, ifname) is None:
            _tolerate_exists("add bridge", f"{ifname} in netns {netns}", handle.link, "add",
                             ifname=ifname, kind="bridge")
        handle.link("set", index=_index(handle, netns, ifname), state="up")


def ensure_veth(netns: str, ifname: str, peer_netns: str, peer_ifname: str) -> None:
    """A veth pair created directly across two namespaces (it never exists in the root netns)."""
    with ipr(netns) as handle:
        if link_index(handle, ifname) is not None:
            return
        peer_fd = os.open(netns_path(peer_netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _tolerate_exists("add veth", f"{ifname} in netns {netns} <-> {peer_ifname} in netns {peer_netns}",
                             handle.link, "add", ifname=ifname, kind="veth",
                             peer={"ifname": peer_ifname, "net_ns_fd": peer_fd})
        finally:
            os.close(peer_fd)
        if link_index(handle, ifname) is None:
            raise KernelError("add veth", f"{ifname} in netns {netns}", errno.EEXIST,
                              f"{peer_ifname} probably already exists in netns {peer_netns}")


def set_up(netns: str, ifname: str, master: str | None = None) -> None:
    with ipr(netns) as handle:
        index = _index(handle, netns, ifname)
        if master is not None:
            handle.link("set", index=index, master=_index(handle, netns, master))
        handle.link("set", index=index, state="up")


def ensure_address(netns: str, ifname: str, address: str, prefixlen: int) -> None:
    with ipr(netns) as handle:
        _tolerate_exists("add address", f"{address}/{prefixlen} on {ifname} in netns {netns}", handle.addr,
                         "add", index=_index(handle, netns, ifname), address=address, prefixlen=prefixlen)


def ensure_route(netns: str, dst: str, *, gateway: str | None = None, ifname: str | None = None,
                 scope: str | None = None) -> None:
    """``dst`` is a CIDR, "default" or "default6" (IPv6). With ``ifname`` and no gateway the route is a link route."""
    with ipr(netns) as handle:
        spec: dict = {"dst": {"default": "0.0.0.0/0", "default6": "::/0"}.get(dst, dst)}
        if ":" in spec["dst"]:
            spec["family"] = 10  # AF_INET6
        if gateway:
            spec["gateway"] = gateway
        if ifname:
            spec["oif"] = _index(handle, netns, ifname)
        if scope == "link":
            spec["scope"] = 253
        _tolerate_exists("add route", f"{dst} in netns {netns}", handle.route, "add", **spec)


def set_sysctl(netns: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen from inside ``netns`` (net.* sysctls are per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> str:
        with open(path, "w") as f:
            f.write(value)
        with open(path) as f:
            return f.read().strip()

    try:
        got = run_in_netns(netns, write)
    except OSError as exc:
        raise KernelError("set sysctl", f"{key} in netns {netns}", exc.errno) from exc
    if got != value:
        raise KernelError("set sysctl", f"{key} in netns {netns}", detail=f"reads back {got!r}, wanted {value!r}")


def interfaces(netns: str) -> list[str]:
    with ipr(netns) as handle:
        return sorted(link.get_attr("IFLA_IFNAME") for link in handle.get_links())
