"""``python -m bench.idlewake``: what waking a process on another, idle CPU costs, against how long that CPU idled.

Two processes ping-pong one byte over a socketpair, either both on one CPU or one on each of two; the
replying process first spins D µs, so in the two-CPU layout the asking process's CPU idles about D µs
longer per round trip. The printed figure is the median round trip minus D: on one CPU it is two
context switches; on two CPUs, two cross-CPU wake-ups. Where idle CPUs halt (a VM without guest
halt-polling: ``haltpoll.guest_halt_poll_ns=0`` on the CI and development VMs' kernel command line), a
wake-up after a long idle costs more (the host has put the halted virtual CPU to sleep); that is why
the bench's ping-pong depends on where the scheduler puts the processes, and why a proxy's CPU per hop
counts twice there (docs/performance-latency.md, "Where the processes run"). Needs two CPUs; touches no
network.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

SPINS_US = (0, 10, 20, 40, 80, 160, 320)


def spin(us: float) -> None:
    end = time.perf_counter_ns() + int(us * 1000)
    while time.perf_counter_ns() < end:
        pass


def round_trip_us(cpus: tuple[int, int], spin_us: float, exchanges: int = 3000, warmup: int = 300) -> float:
    """Median round trip minus ``spin_us``, the asker on ``cpus[0]`` and the replier on ``cpus[1]``."""
    asker, replier = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            os.sched_setaffinity(0, {cpus[1]})
            asker.close()
            while byte := replier.recv(1):
                spin(spin_us)
                replier.send(byte)
        finally:
            os._exit(0)
    replier.close()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        times = []
        for _ in range(exchanges + warmup):
            start = time.perf_counter_ns()
            asker.send(b"x")
            asker.recv(1)
            times.append((time.perf_counter_ns() - start) / 1000)
    finally:
        os.sched_setaffinity(0, allowed)
        asker.close()
        os.waitpid(child, 0)
    return statistics.median(times[warmup:]) - spin_us


def main() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("bench.idlewake needs two CPUs", file=sys.stderr)
        return 2
    one, two = (cpus[0], cpus[0]), (cpus[0], cpus[1])
    print("replier spins (µs) | one CPU: RTT − spin (µs) | two CPUs: RTT − spin (µs) | two − one")
    for spin_us in SPINS_US:
        same = statistics.median(round_trip_us(one, spin_us) for _ in range(2))
        cross = statistics.median(round_trip_us(two, spin_us) for _ in range(2))
        print(f"{spin_us:18} | {same:24.1f} | {cross:25.1f} | {cross - same:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
