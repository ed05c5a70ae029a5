"""glibc malloc settings for a relay: keep the heap instead of handing it back after every chunk.

Bulk relaying allocates and frees buffers of 16 KiB to 1 MiB many thousand times a second. With
glibc's defaults the heap top is returned to the kernel (``brk``) as soon as more than about twice
the mmap threshold is free, and grown again at the next chunk, each time with fresh zeroed pages:
measured on the bulk path, 13,600 ``brk`` calls in 4 s and system time of the proxies ×2.5
(docs/performance-bulk.md). Fixed thresholds stop that: buffers up to ``MMAP_THRESHOLD`` come
from the heap, and up to ``TRIM_THRESHOLD`` of free heap top is kept for the next one.

Complements agent/service/heap.py, which calls ``malloc_trim`` every few seconds: these thresholds stop the
per-chunk churn, the periodic trim still gives memory back after a burst (both run in the agent;
the bench figures in docs/performance-bulk.md from 08:30 on are with both).

The one call into the C library; a no-op where malloc is not glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("tcpmesh.proxy.heap")
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 8 * 1024 * 1024
MMAP_THRESHOLD = 8 * 1024 * 1024  # larger allocations still get their own mapping (returned on free)


def keep_heap_for_relaying() -> bool:
    """Set the fixed thresholds; True if glibc accepted both."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    accepted = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not accepted:
        log.debug("malloc did not accept the relay thresholds; keeping its defaults")
    return accepted
