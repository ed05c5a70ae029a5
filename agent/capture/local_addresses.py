"""This node's own addresses — every address of the agent's network namespace, both families — read with one
rtnetlink dump (``RTM_GETADDR``) on a plain socket.

Asked at every registry apply (``agent.control.workloads``: kube-proxy answers a nodePort on each of them, so
each is a nodePort frontend of the mesh), and again whenever the kernel says an address came or went:
``AddressEvents`` is a subscription to rtnetlink's address notifications (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR)
on a second plain socket, read on the agent's loop (agent.control.node_addresses). Not through pyroute2: importing any part of that package imports all
of it (NDB, sqlite3, multiprocessing, pickle) — ≈ 10 MiB of RSS per agent, which the agent process does not
carry (its netns/veth/tc plumbing runs pyroute2 in child processes; docs/performance-notes.md).
``parse_dump`` and ``address_changed`` are pure; ``local_addresses`` and ``AddressEvents`` open the sockets. Imports nothing of agent/.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100  # the multicast groups of address changes, both families
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x001, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSGHDR = struct.Struct("=IHHII")      # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")     # family, prefix length, flags, scope, interface index
RTATTR = struct.Struct("=HH")           # length, type
RECEIVE_BYTES = 65536


def _aligned(length: int) -> int:
    return (length + 3) & ~3


def dump_request(sequence: int = 1) -> bytes:
    """An RTM_GETADDR dump request for every family (pure)."""
    body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence, 0) + body


def parse_dump(data: bytes) -> tuple[list[str], bool]:
    """Pure: (the addresses of the RTM_NEWADDR messages in ``data`` — IFA_LOCAL, else IFA_ADDRESS —, whether the
    dump's end was in it). OSError for an NLMSG_ERROR carrying an errno."""
    found: list[str] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise OSError(errno.EPROTO, f"a malformed rtnetlink message (length {length} at offset {offset})")
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
            if code:
                raise OSError(-code, f"RTM_GETADDR: {os.strerror(-code)}")
        elif kind == RTM_NEWADDR:
            attributes: dict[int, bytes] = {}
            position = offset + NLMSGHDR.size + IFADDRMSG.size
            while position + RTATTR.size <= offset + length:
                size, attribute = RTATTR.unpack_from(data, position)
                if size < RTATTR.size:
                    break
                attributes[attribute] = data[position + RTATTR.size:position + size]
                position += _aligned(size)
            raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
            if raw is not None and len(raw) in (4, 16):
                found.append(str(ipaddress.ip_address(raw)))
        offset += _aligned(length)
    return found, False


def local_addresses() -> frozenset[str]:
    """Every address of this network namespace, both families, loopback left out (IPv6 link-local included:
    the kernel's records carry no scope a pod's connect would show). OSError when the dump fails."""
    found: list[str] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.sendto(dump_request(), (0, 0))
        done = False
        while not done:
            addresses, done = parse_dump(sock.recv(RECEIVE_BYTES))
            found.extend(addresses)
    return frozenset(a for a in found if not ipaddress.ip_address(a).is_loopback)


def address_changed(data: bytes) -> bool:
    """Pure: whether a batch of rtnetlink notifications holds an address added or removed (RTM_NEWADDR, RTM_DELADDR;
    a flag change of an address comes as RTM_NEWADDR too — the caller compares the addresses it reads)."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            return True  # malformed: say changed, so the caller reads the addresses again (never misses one)
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return True
        offset += _aligned(length)
    return False


class AddressEvents:
    """A subscription to this network namespace's address notifications, both families: a non-blocking netlink
    socket for the caller's loop (``fileno``); ``drain`` reads what is pending. The kernel drops notifications
    when the socket's buffer is full (ENOBUFS on the next read): that counts as a change, since the caller then
    reads every address again — the notifications only say *when* to read, never *what* the addresses are."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        try:
            self._sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read every pending notification; True when an address may have come or gone since the last drain."""
        changed = False
        while True:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                changed = True  # notifications were lost: read the addresses again
                continue
            changed = changed or address_changed(data)

    def close(self) -> None:
        self._sock.close()
