"""The ctypes mirror of bpf/splice/abi.h (the same-node kernel splice); tests/unit/test_proxy_splice.py
compiles the header with gcc and compares every constant with this module. Pure: imports only ctypes."""

from __future__ import annotations

import ctypes

SPLICE_ABI_VERSION = 1
SPLICE_SOCKETS = 65536

REASONS = {0: "redirected", 1: "no_peer", 2: "empty"}
REASON_MAX = 3
REASON_SLOTS = 8

# map name → (key size, value size per CPU); the sockhash's value is a socket fd on update (u32 here,
# the kernel reads 4 or 8 bytes) and the socket cookie on lookup
MAPS = {
    "tcpmesh_splice_peers": (ctypes.sizeof(ctypes.c_uint64), ctypes.sizeof(ctypes.c_uint32)),
    "tcpmesh_splcnt": (ctypes.sizeof(ctypes.c_int), ctypes.sizeof(ctypes.c_uint64)),
}
