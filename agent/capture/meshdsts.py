"""Which destinations are in the mesh: registry entries encoded as tcpmesh_mesh_dsts keys.

Pure: ``mesh_entries`` turns destinations (a workload's address; later a Service address and port;
a prefix of either family) into what ConnectCapture writes into the LPM trie, and ``lookup`` is
what the connect hooks then decide for one address and port (for tests and `doctor`). A connect
to anything that is not in the mesh is never redirected: it leaves from the pod itself, or is
refused at connect() when policy.outbound_passthrough is DENY (docs/capture.md, "Only the mesh").
Imports the ABI mirror and the standard library only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from agent.capture import abi
from agent.errors import ConfigError

MAX_MESH_DSTS = 65536  # TCPMESH_MAX_MESH_DSTS in bpf/lib/maps.h

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MeshDestination:
    network: Network              # one address (/32, /128) or a prefix
    port: int | None = None       # only this port (needs one address); None: every port
    kind: int = abi.DST_WORKLOAD  # abi.DST_WORKLOAD / DST_SERVICE / DST_OUTSIDE (a hole)


def destination(address: str, port: int | None = None, kind: int = abi.DST_WORKLOAD) -> MeshDestination:
    """A destination from text: an address or a prefix of either family. Errors name the value."""
    try:
        network = ipaddress.ip_network(address, strict=True)
    except ValueError as exc:
        raise ConfigError("mesh destination", address, f"not an IP address or prefix ({exc})",
                          "give an address (10.77.1.11, fd00::11) or a prefix with its host bits clear") from exc
    if port is not None and (network.prefixlen != network.max_prefixlen or not 1 <= port <= 65535):
        raise ConfigError("mesh destination", f"{address} port {port}",
                          "a port needs one address and must be 1-65535", "drop the port or give one address")
    return MeshDestination(network, port, kind)


def workload_destinations(addresses: Iterable[str]) -> list[MeshDestination]:
    """Every workload address of the registry, any port."""
    return [destination(address) for address in addresses]


def service_destinations(frontends: Iterable[tuple[str, int]]) -> list[MeshDestination]:
    """Every Service virtual address with its port (only that port is the Service's)."""
    return [destination(address, port, abi.DST_SERVICE) for address, port in frontends]


def ipv4_mesh_cidrs(addresses: Iterable[str], capture: Iterable[str], bypass: Iterable[str] = ()) -> list[str]:
    """For the packet-level modes (ebpf-tc, iptables), which steer by CIDR: every IPv4 workload
    address inside the configured capture CIDRs, as a /32 (sorted, unique). IPv6 is ebpf-connect's."""
    from agent.capture.cidrs import is_captured, lpm_entries  # cidrs is pure too; imported late to stay small

    scope = lpm_entries(capture, bypass)
    found = {address for address in addresses
             if isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address) and is_captured(scope, address)}
    return [f"{address}/32" for address in sorted(found, key=lambda a: int(ipaddress.IPv4Address(a)))]


def mesh_entries(destinations: Iterable[MeshDestination]) -> dict[bytes, int]:
    """{bytes(tcpmesh_dst_key): kind}; the same destination twice keeps the last kind."""
    entries = {bytes(abi.dst_key(d.network, d.port)): d.kind for d in destinations}
    if len(entries) > MAX_MESH_DSTS:
        raise ConfigError("registry", len(entries), f"more mesh destinations than the kernel map holds ({MAX_MESH_DSTS})",
                          "raise TCPMESH_MAX_MESH_DSTS in bpf/lib/maps.h, or split the mesh")
    return entries


def lookup(entries: dict[bytes, int], address: str, port: int) -> int | None:
    """The kind the connect hooks find for ``address``:``port`` (longest match), or None (no entry)."""
    probe = abi.DstKey.from_buffer_copy(bytes(abi.dst_key(ipaddress.ip_network(address), port)))
    best: tuple[int, int] | None = None
    for raw, kind in entries.items():
        key = abi.DstKey.from_buffer_copy(raw)
        if _prefix_matches(key, probe) and (best is None or key.prefixlen > best[0]):
            best = (key.prefixlen, kind)
    return None if best is None else best[1]


def in_mesh(entries: dict[bytes, int], address: str, port: int) -> bool:
    kind = lookup(entries, address, port)
    return kind is not None and kind != abi.DST_OUTSIDE


def _prefix_matches(key: abi.DstKey, probe: abi.DstKey) -> bool:
    bits = key.prefixlen
    a, b = bytes(key)[4:], bytes(probe)[4:]
    whole, rest = divmod(bits, 8)
    if a[:whole] != b[:whole]:
        return False
    if rest == 0:
        return True
    mask = (0xFF << (8 - rest)) & 0xFF
    return (a[whole] & mask) == (b[whole] & mask)


# What a new maps directory holds until the agent has its first registry snapshot: every
# destination counts as in the mesh, so every connect goes to the proxy, which refuses what is not
# in the registry (fail closed: nothing meant for the mesh leaves in plaintext meanwhile).
CAPTURE_EVERYTHING: tuple[MeshDestination, ...] = (
    MeshDestination(ipaddress.IPv4Network("0.0.0.0/0")), MeshDestination(ipaddress.IPv6Network("::/0")))
