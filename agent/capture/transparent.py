"""The origin of a connection delivered transparently (ebpf-tc sk_assign, iptables TPROXY).

Such a connection arrives on the IP_TRANSPARENT listener with the pod's own addresses on both
ends: the accepted socket's local address (``getsockname()``) *is* the original destination. A
socket whose local address is one of the node's own was not captured (something dialled the
outbound port directly) and gets no origin, so the proxy refuses it. The pid, uid, cgroup and comm
of the client are unknown in these modes (the packet left the pod's socket behind at the veth):
those fields are None. One getsockname() call; no bcc, no netlink on the data path.
"""

from __future__ import annotations

import ipaddress
import socket

from agent.capture.origin import Origin


def lookup_address(bind_address: str) -> str:
    """Where a socket lookup (tc program, TPROXY --on-ip) finds the listener: a 0.0.0.0 listener is
    found through 127.0.0.1; a listener bound to one address through that address."""
    return "127.0.0.1" if ipaddress.IPv4Address(bind_address).is_unspecified else bind_address


class TransparentOrigins:
    """``origin(sock)`` for the transparent modes; ``local`` (the node's addresses) is swapped whole."""

    def __init__(self, local: frozenset[str] = frozenset()) -> None:
        self.local = local

    def origin(self, sock: socket.socket) -> Origin | None:
        return transparent_origin(sock, self.local)


def transparent_origin(sock: socket.socket, local: frozenset[str]) -> Origin | None:
    try:
        ip, port = sock.getsockname()[:2]
    except OSError:
        return None
    if ip in local or ip.startswith("127.") or ip == "0.0.0.0":
        return None
    return Origin(dst_ip=ip, dst_port=port, pid=None, uid=None, cgroup_id=None, cookie=None, comm=None)
