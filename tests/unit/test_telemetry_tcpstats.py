"""Kernel TCP stats without a kernel: the C ABI header against its ctypes mirror (compiled with gcc),
the RTT bucket arithmetic in C and Python, and the user-space side (legs, slots, removal, scrape)
over a fake libbpf."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.connection import flow as F
from agent.telemetry import tcpstats
from agent.telemetry import tcpstats_abi as abi
from tests.conftest import require_binary

BPF = Path(__file__).resolve().parents[2] / "bpf"
RTT_VALUES = [0, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 65536, 8388608, 8388609, 4294967295]

PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include "tcpstats/rtt.h"
int main(void) {
    unsigned int values[] = {%s};
    printf("sock %%zu %%zu %%zu\n", sizeof(struct tcpmesh_stats_sock), offsetof(struct tcpmesh_stats_sock, slot),
           offsetof(struct tcpmesh_stats_sock, retrans_seen));
    printf("stats %%zu %%zu %%zu %%zu %%zu\n", sizeof(struct tcpmesh_tcp_stats),
           offsetof(struct tcpmesh_tcp_stats, retransmits), offsetof(struct tcpmesh_tcp_stats, rtt_samples),
           offsetof(struct tcpmesh_tcp_stats, rtt_sum_us), offsetof(struct tcpmesh_tcp_stats, rtt_buckets));
    printf("consts %%d %%d %%d %%d %%d %%d %%d %%d\n", TCPMESH_STATS_ABI_VERSION, TCPMESH_RTT_FIRST_SHIFT,
           TCPMESH_RTT_BOUNDED, TCPMESH_RTT_BUCKETS, TCPMESH_STATS_SLOTS, TCPMESH_STATS_SOCKETS,
           TCPMESH_SR_MAX, TCPMESH_SR_SLOTS);
    printf("reasons %%d %%d %%d %%d\n", TCPMESH_SR_UNTRACKED, TCPMESH_SR_BAD_SLOT, TCPMESH_SR_FORGOTTEN,
           TCPMESH_SR_ENABLED);
    printf("buckets");
    for (unsigned int i = 0; i < sizeof(values) / sizeof(values[0]); i++)
        printf(" %%u", tcpmesh_rtt_bucket(values[i]));
    printf("\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, list[int]]:
    require_binary("gcc", "gcc")
    work = tmp_path_factory.mktemp("abi")
    (work / "probe.c").write_text(PROBE % ", ".join(f"{v}u" for v in RTT_VALUES))
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{BPF}", "-o", str(work / "probe"), str(work / "probe.c")],
                   check=True, capture_output=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()}


def test_the_c_header_and_the_ctypes_mirror_agree(probe):
    assert probe["sock"] == [ctypes.sizeof(abi.StatsSock), abi.StatsSock.slot.offset, abi.StatsSock.retrans_seen.offset]
    assert probe["stats"] == [ctypes.sizeof(abi.TcpStats), abi.TcpStats.retransmits.offset,
                              abi.TcpStats.rtt_samples.offset, abi.TcpStats.rtt_sum_us.offset,
                              abi.TcpStats.rtt_buckets.offset]
    assert probe["consts"] == [abi.STATS_ABI_VERSION, abi.RTT_FIRST_SHIFT, abi.RTT_BOUNDED, abi.RTT_BUCKETS,
                               abi.STATS_SLOTS, abi.STATS_SOCKETS, abi.REASON_MAX, abi.REASON_SLOTS]
    assert probe["reasons"] == sorted(abi.REASONS)
    assert ctypes.sizeof(abi.TcpStats) % 8 == 0  # per-CPU values are 8-byte aligned with no slack


def test_rtt_buckets_agree_between_c_and_python(probe):
    assert probe["buckets"] == [abi.rtt_bucket(v) for v in RTT_VALUES]
    bounds = abi.bucket_upper_bounds_seconds()
    assert bounds[0] == 16e-6 and bounds[-1] == 8.388608 and len(bounds) == abi.RTT_BOUNDED
    for value in RTT_VALUES[1:]:
        bucket = abi.rtt_bucket(value)
        if bucket < abi.RTT_BOUNDED:
            assert value / 1e6 <= bounds[bucket] and (bucket == 0 or value / 1e6 > bounds[bucket - 1])


class FakeLibbpf:
    """Per-CPU arrays and hashes as dicts, with the kernel's value layouts."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus
        self.maps: dict[int, dict[bytes, bytes]] = {1: {}, 2: {}, 3: {}}

    def possible_cpus(self):
        return self.cpus

    def map_update(self, fd, key, value, target):
        self.maps[fd][key] = value

    def map_lookup(self, fd, key, size, target):
        value = self.maps[fd].get(key)
        return None if value is None else value[:size]

    def map_keys(self, fd, size, target):
        return list(self.maps[fd])

    def map_delete(self, fd, key, target):
        return self.maps[fd].pop(key, None) is not None


class FakeSock:
    def __init__(self, cookie: int, retrans: int = 0) -> None:
        self.cookie, self.retrans = cookie, retrans

    def getsockopt(self, level, option, length):
        if option == tcpstats.SO_COOKIE:
            return self.cookie.to_bytes(8, sys.byteorder)
        info = bytearray(length)
        info[100:104] = self.retrans.to_bytes(4, sys.byteorder)
        return bytes(info)


class Leg:
    def __init__(self, sock) -> None:
        self._sock = sock

    def socket(self):
        return self._sock


class Session:
    def __init__(self, sock) -> None:
        self.tls = Leg(sock)


class Stream:
    """A stream of a multiplexed tunnel: no socket of its own."""

    def __init__(self, sock) -> None:
        self.session = Session(sock)

    def socket(self):
        return None


def loaded_stats(cpus: int = 2) -> tuple[tcpstats.KernelTcpStats, FakeLibbpf]:
    stats = tcpstats.KernelTcpStats("/sys/fs/bpf/x", "/sys/fs/cgroup/x", "/tmp", slots=8)
    fake = FakeLibbpf(cpus)
    stats.libbpf, stats._cpus = fake, cpus
    stats._maps = {tcpstats.SOCKS: 1, tcpstats.PAIRS: 2, tcpstats.COUNTERS: 3}
    return stats, fake


def a_flow(reporter: str, src: str = "web", dst: str = "db") -> F.Flow:
    flow = F.Flow(reporter, security=F.SECURITY_MTLS)
    flow.source_workload, flow.source_namespace, flow.source_principal = src, "shop", f"spiffe://td/ns/shop/sa/{src}"
    flow.destination_workload, flow.destination_namespace = dst, "data"
    flow.destination_principal = f"spiffe://td/ns/data/sa/{dst}"
    return flow


def registered(fake: FakeLibbpf) -> dict[int, tuple[int, int]]:
    return {int.from_bytes(k, sys.byteorder): (abi.StatsSock.from_buffer_copy(v).slot,
                                               abi.StatsSock.from_buffer_copy(v).retrans_seen)
            for k, v in fake.maps[1].items()}


def test_each_reporter_registers_its_app_and_tunnel_legs_and_a_pooled_tunnel_once():
    stats, fake = loaded_stats()
    stats.flow_started(a_flow(F.REPORTER_SOURCE), Leg(FakeSock(11)), Stream(FakeSock(12, retrans=3)))
    stats.flow_started(a_flow(F.REPORTER_DESTINATION), Stream(FakeSock(21)), Leg(FakeSock(22)))
    legs = {values[:2]: slot for values, slot in stats._series.items()}
    assert set(legs) == {("source", "app"), ("source", "tunnel"), ("destination", "tunnel"), ("destination", "app")}
    socks = registered(fake)
    assert socks[11][0] == legs[("source", "app")] and socks[12] == (legs[("source", "tunnel")], 3)
    assert socks[21][0] == legs[("destination", "tunnel")] and socks[22][0] == legs[("destination", "app")]
    del fake.maps[1][(12).to_bytes(8, sys.byteorder)]
    stats.flow_started(a_flow(F.REPORTER_SOURCE), Leg(FakeSock(13)), Stream(FakeSock(12, retrans=9)))
    assert 12 not in registered(fake), "a pooled tunnel's socket must not be re-registered (it would reset)"
    passthrough = a_flow(F.REPORTER_SOURCE)
    passthrough.security = F.SECURITY_NONE
    stats.flow_started(passthrough, Leg(FakeSock(99)), Leg(FakeSock(98)))
    assert 99 not in registered(fake)


def test_scrape_sums_cpus_into_a_cumulative_histogram_and_removed_series_go():
    stats, fake = loaded_stats(cpus=2)
    stats.flow_started(a_flow(F.REPORTER_SOURCE), Leg(FakeSock(1)), Leg(FakeSock(2)))
    app_slot = stats._series[next(v for v in stats._series if v[1] == "app")]
    per_cpu = []
    for cpu, (rtt_us, samples, retrans) in enumerate(((20, 3, 1), (100, 2, 4))):
        one = abi.TcpStats(retransmits=retrans, rtt_samples=samples, rtt_sum_us=rtt_us * samples)
        one.rtt_buckets[abi.rtt_bucket(rtt_us)] = samples
        per_cpu.append(bytes(one))
    fake.maps[2][app_slot.to_bytes(4, sys.byteorder)] = b"".join(per_cpu)
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    get = registry.get_sample_value
    labels = {"reporter": "source", "leg": "app", "source_workload": "web", "source_workload_namespace": "shop",
              "source_principal": "spiffe://td/ns/shop/sa/web", "destination_workload": "db",
              "destination_workload_namespace": "data", "destination_principal": "spiffe://td/ns/data/sa/db"}
    assert get("tcpmesh_tcp_retransmits_total", labels) == 5
    assert get("tcpmesh_tcp_rtt_seconds_count", labels) == 5
    assert get("tcpmesh_tcp_rtt_seconds_sum", labels) == pytest.approx((20 * 3 + 100 * 2) / 1e6)
    assert get("tcpmesh_tcp_rtt_seconds_bucket", {**labels, "le": "3.2e-05"}) == 3
    assert get("tcpmesh_tcp_rtt_seconds_bucket", {**labels, "le": "0.000128"}) == 5
    assert get("tcpmesh_tcp_rtt_seconds_bucket", {**labels, "le": "+Inf"}) == 5
    assert "10.77" not in text
    assert stats.retain([("shop", "web")]) == 2  # db left: both legs' series go, their sockets too
    assert registered(fake) == {}
    assert 'source_workload="web"' not in generate_latest(registry).decode()
    stats.flow_started(a_flow(F.REPORTER_SOURCE, dst="web"), Leg(FakeSock(5)), Leg(FakeSock(6)))
    reused = stats._series[next(v for v in stats._series if v[1] == "app")]
    assert fake.maps[2][reused.to_bytes(4, sys.byteorder)] == bytes(ctypes.sizeof(abi.TcpStats) * 2)  # zeroed


def test_a_partial_read_emits_no_series():
    stats, fake = loaded_stats()
    stats.flow_started(a_flow(F.REPORTER_SOURCE), Leg(FakeSock(1)), Leg(FakeSock(2)))
    fake.maps[2].clear()  # a slot that cannot be read
    assert stats.read() is None
    families = {f.name: f for f in stats.collect()}
    assert families["tcpmesh_tcp_rtt_seconds"].samples == []


def test_slots_run_out_without_failing_the_flow():
    stats, fake = loaded_stats()
    for i in range(10):
        stats.flow_started(a_flow(F.REPORTER_SOURCE, src=f"w{i}"), Leg(FakeSock(100 + i)), Leg(FakeSock(200 + i)))
    assert len(stats._series) == 8 and stats.exhausted == 12


def test_pin_names_change_with_the_sources_and_sizes(tmp_path):
    for rel in (tcpstats.SOURCE_NAME, *tcpstats.HEADERS):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((BPF / rel).read_text())
    maps, prog = tcpstats.pin_names(tmp_path, 4096, 65536)
    assert maps.startswith("tcpstats-maps-v1-") and prog.startswith("tcpstats-set-v1-")
    assert tcpstats.pin_names(tmp_path, 4096, 65536) == (maps, prog)
    assert tcpstats.pin_names(tmp_path, 1024, 65536)[0] != maps
    (tmp_path / tcpstats.SOURCE_NAME).write_text("/* changed */" + (BPF / tcpstats.SOURCE_NAME).read_text())
    changed = tcpstats.pin_names(tmp_path, 4096, 65536)
    assert changed[0] == maps and changed[1] != prog  # the program changed, the maps did not
