"""Which destinations the connect4 hook captures: parsing CIDR lists and encoding them as LPM keys.

Pure: the result of ``lpm_entries`` is what ConnectCapture writes into tcpmesh_capture_cidrs.
Longest prefix wins in the trie, so a bypass prefix inside a capture prefix punches a hole in it;
a destination matching nothing is not captured. The same prefix in both lists is an error.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from agent.capture import abi
from agent.errors import ConfigError

DEFAULT_CAPTURE_CIDRS = ("0.0.0.0/0",)
MAX_CIDRS = 1024  # TCPMESH_MAX_CIDRS in bpf/lib/maps.h


def parse_cidrs(field: str, values: Iterable[str]) -> tuple[ipaddress.IPv4Network, ...]:
    """Validate IPv4 CIDRs; errors name the field, the value and the fix."""
    if isinstance(values, str):
        raise ConfigError(field, values, "must be a list of CIDRs, not one string", f"write [{values!r}]")
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.IPv4Network(str(value), strict=True))
        except ValueError as exc:
            raise ConfigError(field, value, f"not an IPv4 CIDR ({exc})",
                              "write the network address with a prefix length, e.g. 10.0.0.0/8") from exc
    return tuple(dict.fromkeys(networks))


def lpm_entries(capture: Iterable[str], bypass: Iterable[str] = ()) -> dict[tuple[int, int], int]:
    """{(prefixlen, ip4 in network order): action} for the LPM trie."""
    captured = parse_cidrs("capture_cidrs", capture)
    bypassed = parse_cidrs("bypass_cidrs", bypass)
    both = set(captured) & set(bypassed)
    if both:
        net = sorted(both)[0]
        raise ConfigError("bypass_cidrs", str(net), "is also in capture_cidrs", "list each prefix in one of them")
    entries: dict[tuple[int, int], int] = {}
    for action, networks in ((abi.CIDR_CAPTURE, captured), (abi.CIDR_BYPASS, bypassed)):
        for net in networks:
            key = abi.cidr_key(net)
            entries[(key.prefixlen, key.ip4)] = action
    if len(entries) > MAX_CIDRS:
        raise ConfigError("capture_cidrs", len(entries), f"too many prefixes (the map holds {MAX_CIDRS})",
                          "merge adjacent prefixes")
    return entries


def is_captured(entries: dict[tuple[int, int], int], ip: str) -> bool:
    """What the LPM lookup in connect4 decides for ``ip`` (CIDR part only), for tests and `doctor`."""
    addr = int(ipaddress.IPv4Address(ip))
    best: tuple[int, int] | None = None
    for (prefixlen, net_u32), action in entries.items():
        net = int(ipaddress.IPv4Address(abi.net_u32_to_ip4(net_u32)))
        mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
        if addr & mask == net and (best is None or prefixlen > best[0]):
            best = (prefixlen, action)
    return best is not None and best[1] == abi.CIDR_CAPTURE
