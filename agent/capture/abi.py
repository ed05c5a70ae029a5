"""The ctypes mirror of bpf/include/tcpmesh_abi.h: every shared struct, constant and reason code.

tests/bpf/test_abi_layout.py compiles the C header with gcc and loads it with bcc, and checks
both against this module, so a change on one side without the other fails the build.
Pure: imports ctypes and the standard library only (no bcc, no sockets).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

ABI_VERSION = 6
# The first ABI version whose struct tcpmesh_origin has OriginStruct's layout: records of versions
# ORIGIN_LAYOUT_SINCE..ABI_VERSION are read alike (an upgrade's previous set may still answer).
ORIGIN_LAYOUT_SINCE = 6
# Records of ORIGIN_LEGACY_SINCE..ORIGIN_LAYOUT_SINCE-1 are the first ORIGIN_LEGACY_SIZE bytes of
# OriginStruct (no dst_ip6): read alike, as IPv4 records.
ORIGIN_LEGACY_SINCE = 3
ORIGIN_LEGACY_SIZE = 48

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80  # at SOL_IPV6
# tcpmesh's own getsockopt option at level SOL_IP (0x746d, "tm"): answer is struct tcpmesh_origin.
SO_ORIGIN = 0x746D

COMM_LEN = 16
AF_INET = 2

CIDR_BYPASS = 0
CIDR_CAPTURE = 1

# enum tcpmesh_reason, in code order. Append only: a code is never renumbered or reused.
REASONS: tuple[str, ...] = (
    "captured",            # connect4: destination rewritten to the redirect address
    "not_captured",        # connect4: IPv4 TCP, destination outside the capture CIDRs
    "not_tcp",             # connect4: not a TCP stream socket
    "loopback",            # connect4: 127.0.0.0/8 or 0.0.0.0/8, never captured
    "to_redirect",         # connect4: destination is the redirect address itself
    "map_update_failed",   # any hook: a map update failed (connect4 then refuses the connect)
    "rekeyed",             # sockops: record published under the connection's peer key
    "stale_peer_cleared",  # retired in ABI 3 (records are bound to their handshake): never counted
    "origin_answered",     # getsockopt: TCPMESH_SO_ORIGIN answered
    "origdst_answered",    # getsockopt: SO_ORIGINAL_DST answered
    "origin_missing",      # getsockopt: no record for the peer
    "optlen_short",        # getsockopt: caller's buffer too small
    "peername_rewritten",  # getpeername4/6: app shown its original destination
    "ipv6",                # retired in ABI 6 (native IPv6 goes through the mesh lookup): never counted
    "v4mapped",            # connect6: captured a v4-mapped destination (also counted as captured)
    "guard_denied",        # guard: TCP connect from a pod cgroup that is not captured (yet): EPERM
    "guard_exempt",        # guard: such a connect to loopback or the redirect address, let through
    "proxy_conn",          # proxy sockops: an inbound-proxy connection to a pod recorded
    "plaintext_rejected",  # inbound: a SYN from outside the mesh dropped (STRICT pod)
    "plaintext_accepted",  # inbound: a SYN from outside the mesh let in (PERMISSIVE pod)
    "origin_claimed",      # getsockopt: the record was answered and deleted (one answer per connection)
    "origin_closed",       # sockops: a captured socket closed, its record deleted
    "slot_taken",          # connect4/6: the socket's slot belongs to a live socket: record in the LRU instead
    "handover_slot_taken",  # sockops: the connection's hand-over slot was in use: record in tcpmesh_peer_origin
    "handover_reclaimed",  # sockops: a hand-over slot unanswered for TCPMESH_HANDOVER_TTL_NS was reused
    "outside_mesh_allowed",  # connect4/6: TCP to a destination outside the mesh, left alone (leaves from the pod)
    "outside_mesh_denied",   # connect4/6: the same refused with EPERM (policy.outbound_passthrough DENY)
    "egress_event_lost",     # connect4/6: tcpmesh_egress full: no event for a connect outside the mesh
    "captured6",             # connect6: captured a native IPv6 destination in the mesh (also counted as captured)
    "ipv6_refused",          # connect6: IPv6 destination in the mesh while IPv6 meshing is off: EPERM
    "family_mismatch",       # getsockopt: SOL_IP/SO_ORIGINAL_DST for an IPv6 destination (nothing consumed)
    "guard_host_network",    # guard: TCP connect from the agent's own netns (hostNetwork pods, the agent): let through
    "admin_port_denied",     # connect4/6: a pod's TCP connect to its node's admin address and port: EPERM
)
HO_FREE, HO_WRITING, HO_READY, HO_ANSWERING = 0, 1, 2, 3  # enum tcpmesh_handover_state
INBOUND_PERMISSIVE = 1
INBOUND_STRICT = 2
DST_INET, DST_INET6 = 4, 6            # struct tcpmesh_dst_key.family
DST_ADDR_BITS = 32 + 128              # prefixlen of "one address, any port"
DST_KEY_BITS = 32 + 128 + 16          # prefixlen of "one address and port" (what the hooks look up)
DST_OUTSIDE, DST_WORKLOAD, DST_SERVICE = 0, 1, 2  # enum tcpmesh_dst_kind
SETTING_PASSTHROUGH_DENY = 1          # struct tcpmesh_settings.flags
SETTING_IPV6_OFF = 2
REASON_CODES: dict[str, int] = {name: code for code, name in enumerate(REASONS)}
REASON_MAX = len(REASONS)
REASON_SLOTS = 64  # entries of tcpmesh_counters (TCPMESH_R_SLOTS): room to append reasons

# C names of the constants above, for the layout test (name in C -> value here).
C_CONSTANTS: dict[str, int] = {
    "TCPMESH_ABI_VERSION": ABI_VERSION,
    "TCPMESH_ORIGIN_LAYOUT_SINCE": ORIGIN_LAYOUT_SINCE,
    "TCPMESH_SOL_IP": SOL_IP,
    "TCPMESH_SO_ORIGINAL_DST": SO_ORIGINAL_DST,
    "TCPMESH_SO_ORIGIN": SO_ORIGIN,
    "TCPMESH_COMM_LEN": COMM_LEN,
    "TCPMESH_CIDR_BYPASS": CIDR_BYPASS,
    "TCPMESH_CIDR_CAPTURE": CIDR_CAPTURE,
    "TCPMESH_INBOUND_PERMISSIVE": INBOUND_PERMISSIVE,
    "TCPMESH_HO_FREE": HO_FREE,
    "TCPMESH_HO_WRITING": HO_WRITING,
    "TCPMESH_HO_READY": HO_READY,
    "TCPMESH_HO_ANSWERING": HO_ANSWERING,
    "TCPMESH_INBOUND_STRICT": INBOUND_STRICT,
    "TCPMESH_DST_INET": DST_INET,
    "TCPMESH_DST_INET6": DST_INET6,
    "TCPMESH_DST_ADDR_BITS": DST_ADDR_BITS,
    "TCPMESH_DST_KEY_BITS": DST_KEY_BITS,
    "TCPMESH_DST_OUTSIDE": DST_OUTSIDE,
    "TCPMESH_DST_WORKLOAD": DST_WORKLOAD,
    "TCPMESH_DST_SERVICE": DST_SERVICE,
    "TCPMESH_SETTING_PASSTHROUGH_DENY": SETTING_PASSTHROUGH_DENY,
    "TCPMESH_SETTING_IPV6_OFF": SETTING_IPV6_OFF,
    "TCPMESH_SOL_IPV6": SOL_IPV6,
    "TCPMESH_IP6T_SO_ORIGINAL_DST": IP6T_SO_ORIGINAL_DST,
    "TCPMESH_ORIGIN_LEGACY_SINCE": ORIGIN_LEGACY_SINCE,
    "TCPMESH_ORIGIN_LEGACY_SIZE": ORIGIN_LEGACY_SIZE,
    "TCPMESH_R_MAX": REASON_MAX,
    "TCPMESH_R_SLOTS": REASON_SLOTS,
    **{f"TCPMESH_R_{name.upper()}": code for code, name in enumerate(REASONS)},
}


class SockaddrIn(ctypes.Structure):
    """struct tcpmesh_sockaddr_in: the SO_ORIGINAL_DST answer."""

    _fields_ = [
        ("family", ctypes.c_uint16),   # host order
        ("port", ctypes.c_uint16),     # network order
        ("addr", ctypes.c_uint32),     # network order
        ("zero", ctypes.c_uint8 * 8),
    ]


class OriginStruct(ctypes.Structure):
    """struct tcpmesh_origin: the TCPMESH_SO_ORIGIN answer and the per-connection map value."""

    _fields_ = [
        ("dst_ip4", ctypes.c_uint32),    # network order
        ("dst_port", ctypes.c_uint16),   # network order
        ("version", ctypes.c_uint16),
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
        ("dst_ip6", ctypes.c_uint32 * 4),  # network order; all 0 for an IPv4 destination (ABI 6)
    ]


class SockaddrIn6(ctypes.Structure):
    """struct tcpmesh_sockaddr_in6: the IP6T_SO_ORIGINAL_DST answer."""

    _fields_ = [
        ("family", ctypes.c_uint16),
        ("port", ctypes.c_uint16),       # network order
        ("flowinfo", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),   # network order
        ("scope_id", ctypes.c_uint32),
    ]


class SockSlot(ctypes.Structure):
    """struct tcpmesh_sock_slot: value of tcpmesh_sock_slots (slot = cookie & (SOCK_SLOTS - 1))."""

    _fields_ = [
        ("owner", ctypes.c_uint64),      # socket cookie of the owner, 0 = free
        ("origin", OriginStruct),
    ]


class PeerKey(ctypes.Structure):
    """struct tcpmesh_peer_key: key of tcpmesh_peer_origin (one connection: client ip/port + both ISNs)."""

    _fields_ = [
        ("ip4", ctypes.c_uint32),         # network order
        ("port", ctypes.c_uint16),        # network order
        ("pad", ctypes.c_uint16),
        ("client_seq", ctypes.c_uint32),  # client's initial sequence number + 1, host order
        ("server_seq", ctypes.c_uint32),  # proxy's initial sequence number + 1, host order
    ]


class HandoverSlot(ctypes.Structure):
    """struct tcpmesh_handover_slot: value of tcpmesh_handover_slots (slot = (client_seq ^ server_seq) & mask)."""

    _fields_ = [
        ("state", ctypes.c_uint64),      # HO_FREE / HO_WRITING / HO_READY / HO_ANSWERING
        ("stamp", ctypes.c_uint64),      # bpf_ktime_get_ns() when it became READY
        ("key", PeerKey),
        ("origin", OriginStruct),
    ]


class CidrKey(ctypes.Structure):
    """struct tcpmesh_cidr_key: key of the LPM trie tcpmesh_capture_cidrs."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ip4", ctypes.c_uint32),    # network order
    ]


class CidrValue(ctypes.Structure):
    """struct tcpmesh_cidr_value: value of tcpmesh_capture_cidrs."""

    _fields_ = [("action", ctypes.c_uint32)]


class DstKey(ctypes.Structure):
    """struct tcpmesh_dst_key: key of the LPM trie tcpmesh_mesh_dsts (both families; see the header)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),       # DST_INET / DST_INET6
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint32 * 4),    # network order; IPv4 in addr[0]
        ("port", ctypes.c_uint16),        # network order
        ("pad2", ctypes.c_uint16),
    ]


class DstValue(ctypes.Structure):
    """struct tcpmesh_dst_value: value of tcpmesh_mesh_dsts."""

    _fields_ = [("kind", ctypes.c_uint32)]


class Settings(ctypes.Structure):
    """struct tcpmesh_settings: the one entry of tcpmesh_settings."""

    _fields_ = [("flags", ctypes.c_uint32)]


class EgressEvent(ctypes.Structure):
    """struct tcpmesh_egress_event: one record of the ring buffer tcpmesh_egress."""

    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),    # network order; IPv4 in addr[0]
        ("port", ctypes.c_uint16),        # network order
        ("family", ctypes.c_uint8),       # DST_INET / DST_INET6
        ("denied", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class Flow4(ctypes.Structure):
    """struct tcpmesh_flow4: key of tcpmesh_proxy_conns (a SYN's 4-tuple, network order)."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class Flow6(ctypes.Structure):
    """struct tcpmesh_flow6: key of tcpmesh_pxconn6."""

    _fields_ = [
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class Plaintext(ctypes.Structure):
    """struct tcpmesh_plaintext: one CPU's value of tcpmesh_plaintext."""

    _fields_ = [("rejected", ctypes.c_uint64), ("accepted", ctypes.c_uint64)]


# C struct name -> mirror, for the layout tests.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "tcpmesh_sockaddr_in": SockaddrIn,
    "tcpmesh_origin": OriginStruct,
    "tcpmesh_sock_slot": SockSlot,
    "tcpmesh_peer_key": PeerKey,
    "tcpmesh_handover_slot": HandoverSlot,
    "tcpmesh_cidr_key": CidrKey,
    "tcpmesh_cidr_value": CidrValue,
    "tcpmesh_flow4": Flow4,
    "tcpmesh_flow6": Flow6,
    "tcpmesh_sockaddr_in6": SockaddrIn6,
    "tcpmesh_plaintext": Plaintext,
    "tcpmesh_dst_key": DstKey,
    "tcpmesh_dst_value": DstValue,
    "tcpmesh_settings": Settings,
    "tcpmesh_egress_event": EgressEvent,
}

# Map name -> (key mirror, value mirror); the value of a per-CPU array is one CPU's slot.
# Every map here is pinned in the maps directory.
MAPS: dict[str, tuple[type, type]] = {
    "tcpmesh_sock_slots": (ctypes.c_int, SockSlot),
    "tcpmesh_cookie_origin": (ctypes.c_uint64, OriginStruct),
    "tcpmesh_handover_slots": (ctypes.c_int, HandoverSlot),
    "tcpmesh_peer_origin": (PeerKey, OriginStruct),
    "tcpmesh_capture_cidrs": (CidrKey, CidrValue),
    "tcpmesh_counters": (ctypes.c_int, ctypes.c_uint64),
    "tcpmesh_proxy_conns": (Flow4, ctypes.c_uint32),
    "tcpmesh_pxconn6": (Flow6, ctypes.c_uint32),
    "tcpmesh_inbound_mode": (ctypes.c_uint64, ctypes.c_uint32),
    "tcpmesh_plaintext": (ctypes.c_uint64, Plaintext),
    "tcpmesh_mesh_dsts": (DstKey, DstValue),
    "tcpmesh_settings": (ctypes.c_int, Settings),
}
# Ring buffers (no key or value: records of RINGBUF_MAPS[name] each), pinned in the maps directory too.
RINGBUF_MAPS: dict[str, type[ctypes.Structure]] = {"tcpmesh_egress": EgressEvent}
PINNED_MAPS: tuple[str, ...] = (*MAPS, *RINGBUF_MAPS)
# Socket-storage maps (BPF_MAP_TYPE_SK_STORAGE): no keys to list, bcc has no table class for them.
# None since ABI 4 (tcpmesh_cookie_origin replaced ABI 3's tcpmesh_sock_origin).
SOCKET_STORAGE_MAPS: frozenset[str] = frozenset()


def ip4_to_net_u32(ip: str) -> int:
    """An IPv4 address as the u32 the kernel stores in network order, read on this host."""
    return struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0]


def net_u32_to_ip4(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def port_to_net_u16(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def net_u16_to_port(value: int) -> int:
    return struct.unpack("!H", struct.pack("=H", value))[0]


def peer_key(ip: str, port: int, client_seq: int, server_seq: int) -> PeerKey:
    """The tcpmesh_peer_origin key of one connection: the client's address and both handshake ISNs + 1."""
    return PeerKey(ip4=ip4_to_net_u32(ip), port=port_to_net_u16(port), pad=0, client_seq=client_seq,
                   server_seq=server_seq)


def dst_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network, port: int | None = None) -> DstKey:
    """The tcpmesh_mesh_dsts key of a prefix or address (``port``: only that port; needs a whole address)."""
    packed = network.network_address.packed.ljust(16, b"\0")
    family = DST_INET if network.version == 4 else DST_INET6
    if port is None:
        prefixlen = 32 + (128 if network.prefixlen == network.max_prefixlen else network.prefixlen)
        net_port = 0
    else:
        if network.prefixlen != network.max_prefixlen:
            raise ValueError(f"a port needs one address, not the prefix {network}")
        prefixlen, net_port = DST_KEY_BITS, port_to_net_u16(port)
    key = DstKey(prefixlen=prefixlen, family=family, port=net_port)
    key.addr[:] = list(struct.unpack("=4I", packed))
    return key


def origin_destination(rec: OriginStruct) -> str:
    """The destination address of a record: dst_ip6 when set (ABI 6), else dst_ip4."""
    if any(rec.dst_ip6):
        return str(ipaddress.IPv6Address(struct.pack("=4I", *rec.dst_ip6)))
    return net_u32_to_ip4(rec.dst_ip4)


def egress_destination(event: EgressEvent) -> tuple[str, int]:
    """(address, port) of an egress event."""
    packed = struct.pack("=4I", *event.addr)
    ip = str(ipaddress.IPv4Address(packed[:4]) if event.family == DST_INET else ipaddress.IPv6Address(packed))
    return ip, net_u16_to_port(event.port)


def cidr_key(network: ipaddress.IPv4Network) -> CidrKey:
    """The LPM key of an IPv4 network (host bits must be clear; see agent.capture.cidrs)."""
    return CidrKey(prefixlen=network.prefixlen, ip4=ip4_to_net_u32(str(network.network_address)))


# ---- ebpf-tc mode (bpf/capture_tc.c) -------------------------------------------------------------

# TCPMESH_STEER_MARK: the mark bit of packets handed to a proxy socket (tc sk_assign or TPROXY);
# the node's fwmark rule delivers them locally (agent/capture/steering.py).
STEER_MARK = 0x10000000
# TCPMESH_SOURCE_MARK: SO_MARK of the inbound proxy's legs that leave from the client pod's address;
# bpf/source_return.c steers the replies to sockets carrying it (agent/capture/source_return.py).
SOURCE_MARK = 0x20000000

# enum tcpmesh_tc_reason, in code order. Append only: a code is never renumbered or reused.
TC_REASONS: tuple[str, ...] = (
    "syn_assigned",        # SYN of a captured connection assigned to the proxy listener
    "est_assigned",        # packet of a connection the proxy owns assigned to its socket
    "not_tcp",             # not IPv4 TCP (or a non-first fragment): passed
    "loopback",            # destination 127.0.0.0/8 or 0.0.0.0/8: passed
    "not_captured",        # destination outside the capture CIDRs, or a node address: passed
    "not_ours",            # non-SYN, no proxy socket, never captured (pod answering as a server): passed
    "orphan_dropped",      # non-SYN of a captured connection whose proxy socket is gone: dropped
    "no_listener",         # SYN to capture but no proxy listener: dropped (fail-closed)
    "assign_failed",       # bpf_sk_assign failed: dropped
    "map_update_failed",   # capture record not stored (the SYN is still assigned)
    "short",               # headers not readable even after a pull: passed
)
TC_REASON_MAX = len(TC_REASONS)

C_CONSTANTS.update({
    "TCPMESH_STEER_MARK": STEER_MARK,
    "TCPMESH_SOURCE_MARK": SOURCE_MARK,
    "TCPMESH_TC_R_MAX": TC_REASON_MAX,
    **{f"TCPMESH_TC_R_{name.upper()}": code for code, name in enumerate(TC_REASONS)},
})
