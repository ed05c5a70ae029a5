"""The inbound proxy's connection to a local pod, from the client pod's own address when it may.

``source_for(...)`` (pure) decides the address: the registry's address of the workload the client
node named, only when the registry binds that workload to the identity the tunnel's certificate
proved (so a node proving identity A can only ever borrow an address of an A workload; any other
claim is refused), of the destination's family (its ``ip6`` for an IPv6 destination, whichever of
its addresses the client node named), and not the destination itself.
``connect(...)`` opens the leg: with a source, an IP_TRANSPARENT / IPV6_TRANSPARENT socket bound
to it and marked ``mark`` (the tc return program brings the pod's replies back to sockets with that
mark, agent.capture.source_return); without one, an ordinary socket from the node's address.
Imports no capture or telemetry module: the composition root hands the mark in.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Callable, TypeVar

from agent.identity.spiffe import SpiffeId
from agent.registry.model import Workload

IP_TRANSPARENT = 19          # linux/in.h
IPV6_TRANSPARENT = 75        # linux/in6.h
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is chosen at connect(), for the whole 4-tuple
SO_MARK = getattr(socket, "SO_MARK", 36)

P = TypeVar("P", bound=asyncio.BaseProtocol)


class SourceRefused(Exception):
    """The OPEN names a source address the registry does not give to the tunnel's proven identity."""


def source_for(claimed_ip: str, claimed: Workload | None, peer_id: SpiffeId, dest_ip: str) -> str | None:
    """The client address the leg uses, or None for the node's own address; raises SourceRefused.

    ``claimed`` is the registry's workload at ``claimed_ip``, the source address the client node
    reported. Anything but a workload of the proven identity is refused — not served from the node's
    address, which a server may trust more than the pod's (fail closed)."""
    if claimed is None or claimed.spiffe_id != peer_id:
        owner = f"to {claimed.spiffe_id.uri}" if claimed is not None else "to no workload"
        raise SourceRefused(f"OPEN names source address {claimed_ip or '(none)'}, which the registry gives {owner}, "
                            f"not to the tunnel's proven identity {peer_id.uri}")
    if dest_ip in claimed.addresses:
        return None  # a pod reaching itself: its reply never leaves it
    # the workload's address of the destination's family (an IPv6 client socket reaches the proxy over
    # IPv4, ::ffff:REDIR_IP, so the claim may name the other family); none: the node's address
    return claimed.ip6 if ":" in dest_ip else claimed.ip


def transparent_socket(source_ip: str, mark: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``source_ip`` (not an address of this node), port chosen at connect."""
    v6 = ":" in source_ip
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.bind((source_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(loop: asyncio.AbstractEventLoop, factory: Callable[[], P], dest_ip: str, dest_port: int,
                  source_ip: str | None, mark: int) -> P:
    """The connected leg's protocol. ``source_ip`` None (or ``mark`` 0): from the node's own address."""
    if source_ip is None or not mark:
        _, leg = await loop.create_connection(factory, dest_ip, dest_port)
        return leg
    sock = transparent_socket(source_ip, mark)
    try:
        await loop.sock_connect(sock, (dest_ip, dest_port))
        _, leg = await loop.create_connection(factory, sock=sock)
    except OSError as exc:
        sock.close()
        if exc.errno:  # say why, as create_connection does ("Connection refused"), not "Connect call failed"
            raise OSError(exc.errno, os.strerror(exc.errno)) from None
        raise
    except BaseException:
        sock.close()
        raise
    return leg


def transparent_allowed() -> str:
    """Why this process cannot open transparent sockets ("" when it can): needs CAP_NET_ADMIN."""
    try:
        transparent_socket("127.0.0.2", 1).close()
    except OSError as exc:
        return f"IP_TRANSPARENT socket: {exc.strerror or exc} (the agent needs CAP_NET_ADMIN)"
    return ""
