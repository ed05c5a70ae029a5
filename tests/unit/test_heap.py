"""agent.service.heap: the periodic malloc_trim gives freed heap pages back (resident memory drops), is absent\nwithout glibc, and survives a failing call."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys

from agent.service.heap import heap_trimmer, trim_heap_forever
from tests.conftest import skip_or_fail


def require_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        skip_or_fail(f"malloc_trim is glibc's; this Python runs on {platform.libc_ver()[0] or 'no known libc'}")


# 32 MiB in 64 KiB chunks (below glibc's mmap threshold: all on the heap), touched, then all freed but
# the last, which pins the heap top so free() itself cannot give anything back; then one trim.
# Prints the resident set before and after the trim.
PROBE = r"""
import ctypes
from agent.service.heap import heap_trimmer
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))

chunks = [libc.malloc(64 << 10) for _ in range(512)]
for chunk in chunks:
    ctypes.memset(chunk, 1, 64 << 10)
for chunk in chunks[:-1]:
    libc.free(chunk)
before = rss()
heap_trimmer()()
print(before, rss())
"""


def test_the_trim_gives_freed_heap_memory_back_to_the_kernel():
    require_glibc()
    before, after = (int(x) for x in subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                                                    text=True).stdout.split())
    assert before - after >= 24 << 20, f"resident {before >> 20} MiB before the trim, {after >> 20} MiB after"


def test_a_libc_without_malloc_trim_means_no_trimming():
    class Musl:
        pass

    assert heap_trimmer(Musl()) is None


def test_the_loop_trims_every_interval_and_a_failure_does_not_end_it():
    calls = []

    def trim() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("boom")
        return 0

    async def main() -> None:
        task = asyncio.create_task(trim_heap_forever(trim, interval=0.001))
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(asyncio.wait_for(main(), 5))
    assert len(calls) >= 3
