"""The netlink side of agent.capture.source_return, run as a short-lived child process.

``python -m agent.capture.source_return_child REQUEST_JSON`` does one operation with pyroute2 and
prints one JSON line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. The
agent in ebpf-connect mode never imports pyroute2 (+9 MiB resident, measured), so the return path's
few netlink calls — at start, per pod attach and detach, at stop — run here instead. Requests:

    {"op": "ensure", "netns": N}                              the steering rule and local table, IPv4 (a
                                                              failure is the answer's error) and IPv6;
                                                              result {"ipv6": "ok" | "absent" | why not}
    {"op": "attach", "netns": N, "ip": IP, "fd": FD}          our filter (the program fd is inherited)
                                                              on the interface IP routes through;
                                                              result [ifindex, ifname]
    {"op": "release", "netns": N, "links": [[i, name], ...]}  our filters off those interfaces
    {"op": "stop", "netns": N, "links": [[i, name], ...]}     both: our filters, then the steering objects
"""

from __future__ import annotations

import json
import os
import socket
import sys

from agent.capture import steering, tc_mode
from agent.errors import TcpmeshError

PROGRAM = "tcpmesh_ret_in"
PRIORITY = tc_mode.TC_PRIORITY - 1  # before the ebpf-tc capture filter: a reply to the proxy is not a capture
ETH_P_ALL = 0x0003                  # IPv4 and IPv6
IPV6_PROC = "/proc/sys/net/ipv6"    # absent when the kernel runs without IPv6 (ipv6.disable=1, CONFIG_IPV6=n)


def handle(request: dict):
    op, netns = request["op"], request.get("netns")
    if op == "ensure":
        steering.ensure(netns)
        return {"ipv6": ensure_ipv6(netns)}
    if op == "attach":
        index, ifname = steering.route_interface(request["ip"], netns)
        tc_mode.install_filter(netns, index, ifname, int(request["fd"]), PROGRAM, PRIORITY, ETH_P_ALL)
        return [index, ifname]
    if op == "release":
        removed = []
        for index, ifname in request["links"]:
            removed += tc_mode.remove_filters(netns, int(index), ifname, PROGRAM)
        return removed
    if op == "stop":
        removed, errors = [], []
        for index, ifname in request["links"]:
            try:
                removed += tc_mode.remove_filters(netns, int(index), ifname, PROGRAM)
            except TcpmeshError as exc:
                errors.append(exc)
        try:
            removed += steering.remove(netns)
        except TcpmeshError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]
        return removed
    raise ValueError(f"unknown operation {op!r}")


def ensure_ipv6(netns: str | None) -> str:
    """The IPv6 pair: "ok", "absent" (this kernel has no IPv6: no IPv6 leg can exist), or why it cannot."""
    if not os.path.isdir(IPV6_PROC):
        return "absent"
    try:
        steering.ensure(netns, socket.AF_INET6)
    except TcpmeshError as exc:
        return (f"{exc} (the IPv6 fwmark rule and `local ::/0` table need IPv6 enabled on lo, "
                "net.ipv6.conf.lo.disable_ipv6=0, and CONFIG_IPV6_MULTIPLE_TABLES)")
    return "ok"


def main(argv: list[str]) -> int:
    try:
        print(json.dumps({"ok": True, "result": handle(json.loads(argv[0]))}), flush=True)
    except (TcpmeshError, OSError, ValueError, KeyError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
