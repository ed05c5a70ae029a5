"""agent.capture.local_addresses: the node's own addresses from one rtnetlink dump, without pyroute2."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from agent.capture import local_addresses as la


def attribute(kind: int, value: bytes) -> bytes:
    size = la.RTATTR.size + len(value)
    return la.RTATTR.pack(size, kind) + value + b"\0" * (-size % 4)


def message(kind: int, body: bytes) -> bytes:
    return la.NLMSGHDR.pack(la.NLMSGHDR.size + len(body), kind, 2, 1, 0) + body


def new_address(family: int, **attributes: bytes) -> bytes:
    kinds = {"local": la.IFA_LOCAL, "address": la.IFA_ADDRESS, "label": 3}
    body = la.IFADDRMSG.pack(family, 24, 0, 0, 2) + b"".join(attribute(kinds[k], v) for k, v in attributes.items())
    return message(la.RTM_NEWADDR, body)


def test_a_dump_gives_each_address_local_first_and_says_where_it_ends():
    v4 = ipaddress.IPv4Address("10.77.1.1").packed
    peer = ipaddress.IPv4Address("10.77.1.254").packed
    v6 = ipaddress.IPv6Address("fd00::2").packed
    dump = (new_address(socket.AF_INET, address=peer, local=v4, label=b"eth0\0")   # point-to-point: IFA_LOCAL is ours
            + new_address(socket.AF_INET6, address=v6)                            # IPv6: IFA_ADDRESS only
            + new_address(socket.AF_INET, label=b"x\0"))                           # no address: skipped
    assert la.parse_dump(dump) == (["10.77.1.1", "fd00::2"], False)
    assert la.parse_dump(dump + message(la.NLMSG_DONE, struct.pack("=i", 0))) == (["10.77.1.1", "fd00::2"], True)


def test_an_error_message_and_a_malformed_one_are_errors():
    with pytest.raises(OSError) as refused:
        la.parse_dump(message(la.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16))
    assert refused.value.errno == errno.EPERM
    with pytest.raises(OSError) as malformed:
        la.parse_dump(la.NLMSGHDR.pack(400, la.RTM_NEWADDR, 2, 1, 0))
    assert malformed.value.errno == errno.EPROTO


def test_this_namespace_reads_as_pyroute2_reads_it():
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        expected = {str(ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")))
                    for family in (socket.AF_INET, socket.AF_INET6) for a in ipr.get_addr(family=family)}
    assert la.local_addresses() == frozenset(a for a in expected if not ipaddress.ip_address(a).is_loopback)
