"""Give the C heap's free memory back to the kernel every few seconds (glibc's ``malloc_trim``).

glibc returns freed memory to the kernel only from the top of a heap: after a burst (bulk transfers
with large read buffers, many short connections) the free chunks in the middle stay resident. One
``malloc_trim(0)`` walks the arenas and releases every free page; it takes about 0.1-0.3 ms on the
agent's heap, so calling it every ``HEAP_TRIM_SECONDS`` costs nothing measurable and keeps the
agent's resident memory near what it really holds (docs/performance-notes.md has the figures).
On a C library without ``malloc_trim`` (musl) there is nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from typing import Any, Callable

log = logging.getLogger("tcpmesh.heap")
HEAP_TRIM_SECONDS = 2.0


def heap_trimmer(libc: Any = None) -> Callable[[], int] | None:
    """``malloc_trim(0)`` of the process's C library, or None when it has none."""
    try:
        libc = libc if libc is not None else ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def freeze_startup_objects() -> int:
    """Collect once, then take every Python object alive now (modules, config, registry, BPF tables,
    certificates: what start-up made) out of the cyclic garbage collector's reach (``gc.freeze``).

    A full collection walks every tracked object, and it runs on the event-loop thread in the middle
    of whatever message is being relayed: with the agent's start-up heap it took 80-150 ms
    (docs/performance-latency.md, "Latency under load"); after the freeze it walks only what was made
    since. Reference counting still frees frozen objects; only a cycle among them is never collected.
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def trim_heap_forever(trim: Callable[[], int], interval: float = HEAP_TRIM_SECONDS) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            trim()
        except Exception:  # a task root: trimming is an optimisation, never a reason to stop
            log.exception("malloc_trim failed")
