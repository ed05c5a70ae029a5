"""agent.heap: the periodic malloc_trim is found in glibc, absent elsewhere, and survives a failing call."""

from __future__ import annotations

import asyncio

from agent.heap import heap_trimmer, trim_heap_forever


def test_glibc_has_malloc_trim_and_it_runs():
    trim = heap_trimmer()
    assert trim is not None, "this test runs on glibc (Debian); musl has no malloc_trim"
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


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
