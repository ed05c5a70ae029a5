"""agent.proxy.heap: with the relay thresholds set, a bulk relay chunk comes from the heap and its pages
stay there after it is freed (docs/performance-bulk.md) — observed in /proc/self/maps of a fresh process,
against the same process without them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from agent.proxy import heap
from tests.conftest import skip_or_fail

CHUNK = 4 << 20   # a relay chunk: above glibc's default mmap threshold (128 KiB), below the relay's

# Prints: whether glibc accepted, where a CHUNK-sized malloc landed, the program break (top of the
# brk heap) with the chunk held and after it is freed. Between malloc and free only ctypes calls run,
# so nothing else is allocated above the chunk and glibc's trim decision sees it at the heap top.
PROBE = r"""
import ctypes, sys
from agent.proxy import heap
accepted = heap.keep_heap_for_relaying() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
size = int(sys.argv[2])
heap_start = next(int(line.split("-")[0], 16) for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
chunk = libc.malloc(size)
ctypes.memset(chunk, 1, size)
held = libc.sbrk(0)
libc.free(chunk)
after_free = libc.sbrk(0)
print(accepted, "heap" if heap_start <= chunk < held else "mmap", held, after_free)
"""


def run_probe(mode: str) -> tuple[str, str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(CHUNK)], check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0], out[1], int(out[2]), int(out[3])


@pytest.fixture(scope="module")
def glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        skip_or_fail(f"mallopt thresholds are glibc's; this Python runs on {platform.libc_ver()[0] or 'no known libc'}")


def test_a_relay_chunk_stays_on_the_heap_and_the_heap_keeps_it_after_free(glibc):
    accepted, where, held, after_free = run_probe("tuned")
    assert accepted == "True"
    assert where == "heap"
    assert after_free == held  # the freed chunk's pages are kept for the next one, not trimmed


def test_without_the_thresholds_the_same_chunk_gets_its_own_mapping(glibc):
    # the control: what the thresholds change (a fresh mmap, zeroed pages, per chunk)
    assert run_probe("default")[1] == "mmap"


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap.keep_heap_for_relaying() is False
