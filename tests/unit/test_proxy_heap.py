"""agent.proxy.heap: the fixed malloc thresholds for bulk relaying (docs/performance-bulk.md)."""

import platform

import pytest

from agent.proxy import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_glibc_accepts_the_relay_thresholds():
    assert heap.keep_heap_for_relaying() is True


def test_thresholds_keep_a_bulk_chunk_on_the_heap():
    # A relay chunk (256 KiB read, up to 1 MiB frame) must stay below the mmap threshold.
    assert heap.MMAP_THRESHOLD > 1024 * 1024
    assert heap.TRIM_THRESHOLD >= heap.MMAP_THRESHOLD


def test_without_a_c_library_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert heap.keep_heap_for_relaying() is False
