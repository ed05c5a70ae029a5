"""The ctypes mirror of bpf/tcpstats/abi.h (kernel TCP statistics); a test compiles the header with
gcc and compares every size, offset and constant with this module. Pure: imports only ctypes."""

from __future__ import annotations

import ctypes

STATS_ABI_VERSION = 1
RTT_FIRST_SHIFT = 4
RTT_BOUNDED = 20
RTT_BUCKETS = RTT_BOUNDED + 1
STATS_SLOTS = 4096
STATS_SOCKETS = 65536

REASONS = {0: "untracked", 1: "bad_slot", 2: "forgotten", 3: "enabled"}
REASON_MAX = 4
REASON_SLOTS = 16


class StatsSock(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("retrans_seen", ctypes.c_uint32)]


class TcpStats(ctypes.Structure):
    _fields_ = [
        ("retransmits", ctypes.c_uint64),
        ("rtt_samples", ctypes.c_uint64),
        ("rtt_sum_us", ctypes.c_uint64),
        ("rtt_buckets", ctypes.c_uint64 * RTT_BUCKETS),
    ]


# map name → (key size, value size per CPU)
MAPS = {
    "tcpmesh_stats_socks": (ctypes.sizeof(ctypes.c_uint64), ctypes.sizeof(StatsSock)),
    "tcpmesh_stats_pairs": (ctypes.sizeof(ctypes.c_uint32), ctypes.sizeof(TcpStats)),
    "tcpmesh_stats_counters": (ctypes.sizeof(ctypes.c_int), ctypes.sizeof(ctypes.c_uint64)),
}


def bucket_upper_bounds_seconds() -> list[float]:
    """The ``le`` of each bounded bucket: 2^(i + RTT_FIRST_SHIFT) microseconds, in seconds."""
    return [(1 << (i + RTT_FIRST_SHIFT)) / 1e6 for i in range(RTT_BOUNDED)]


def rtt_bucket(rtt_us: int) -> int:
    """The bucket the kernel puts ``rtt_us`` in (the same arithmetic as tcpmesh_rtt_bucket)."""
    bits = (rtt_us - 1).bit_length() if rtt_us > 0 else 0
    if bits <= RTT_FIRST_SHIFT:
        return 0
    return min(bits - RTT_FIRST_SHIFT, RTT_BOUNDED)
