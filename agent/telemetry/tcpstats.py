"""Kernel TCP health per identity pair, from sockops (bpf/tcp_stats.c): RTT histogram and retransmits
of the application's leg and of the tunnel leg, read from per-CPU BPF maps and summed at scrape time.

``KernelTcpStats`` is the agent's handle on it:
  - ``load()``: adopt the program and maps pinned under the capture's ``bpffs_dir`` (``tcpstats-*``
    directories, apart from the capture's own) or have the capture's loader process compile and pin
    them first (agent.bpf.loader: the agent never imports bcc); attach the program to the
    proxy's cgroup (BPF_F_ALLOW_MULTI), and detach older versions of it there;
  - ``flow_started(flow, client_leg, upstream_leg)`` (data-path loop, once per mesh flow): register
    the proxy's two sockets of the flow — cookie → slot, one bpf(2) update each; a slot stands for
    one series (reporter, leg, identity pair);
  - ``retain(workloads)`` (control plane): free the slots of workloads that left;
  - ``collect()`` (admin thread, at scrape): one per-CPU lookup per slot, summed; nothing is emitted
    from a partial read;
  - ``close()``: detach; the pins stay, so a restarted agent adopts them without compiling.

A pooled tunnel carries the flows of one (source identity, destination identity) pair: its socket
is counted in the series of the flow that registers it (the same pair), labelled with that flow's
workloads. Never raises into the data path: failures are counted and logged once.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent.bpf import attach, pins, sources
from agent.bpf.counters import read_reason_counters
from agent.bpf.errors import AttachError
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import DEFAULT_TIMEOUT, LoadRequest, PinTo, Program
from agent.bpf.pinned import PinnedSet, adopt_or_pin
from agent.connection.flow import REPORTER_SOURCE, SECURITY_MTLS, UNKNOWN, Flow
from agent.telemetry import tcpstats_abi as abi

log = logging.getLogger("tcpmesh.tcpstats")

SOURCE_NAME = "tcp_stats.c"
HEADERS = ("tcpstats/abi.h", "tcpstats/maps.h", "tcpstats/rtt.h")
PROGRAM = "tcpmesh_tstats"
PROG_SOCK_OPS = 13
ATTACH_SOCK_OPS = 3
BPF_F_ALLOW_MULTI = 2
PIN_PREFIX = "tcpstats-"
LAYOUT_VERSION = 1
SO_COOKIE = 57
TCP_INFO = 11
TCPI_TOTAL_RETRANS = 100  # offsetof(struct tcp_info, tcpi_total_retrans), stable UAPI
TCP_INFO_LEN = 104
LEG_APP, LEG_TUNNEL = "app", "tunnel"
STATS_LABELS = ("reporter", "leg", "source_workload", "source_workload_namespace", "source_principal",
                "destination_workload", "destination_workload_namespace", "destination_principal")
SOCKS, PAIRS, COUNTERS = "tcpmesh_stats_socks", "tcpmesh_stats_pairs", "tcpmesh_stats_counters"
REASON_NAMES = tuple(abi.REASONS[code] for code in range(len(abi.REASONS)))  # in code order


def bpf_dir() -> Path:
    """bpf/, as shipped with this package (agent/bpf/sources.py)."""
    return sources.bpf_dir()


def pin_names(source_dir: Path, slots: int, sockets: int) -> tuple[str, str]:
    """(maps directory, program set directory) names for this source tree and these sizes (pure)."""
    maps = hashlib.sha256(f"layout {LAYOUT_VERSION} abi {abi.STATS_ABI_VERSION} slots {slots} "
                          f"sockets {sockets}\n".encode())
    for rel in HEADERS:
        maps.update(hashlib.sha256((source_dir / rel).read_bytes()).digest())
    maps_name = f"{PIN_PREFIX}maps-v{abi.STATS_ABI_VERSION}-{maps.hexdigest()[:16]}"
    prog = hashlib.sha256(f"maps {maps_name}\n".encode())
    for rel in (SOURCE_NAME, *HEADERS):
        prog.update(hashlib.sha256((source_dir / rel).read_bytes()).digest())
    return maps_name, f"{PIN_PREFIX}set-v{abi.STATS_ABI_VERSION}-{prog.hexdigest()[:16]}"


def leg_socket(leg: Any) -> socket.socket | None:
    """The TCP socket under a relay leg: its own, or its tunnel's for a stream of a multiplexed tunnel."""
    sock = leg.socket()
    if sock is None:
        tls = getattr(getattr(leg, "session", None), "tls", None)  # agent.proxy.session.Stream
        sock = tls.socket() if tls is not None else None
    return sock


def socket_cookie(sock: Any) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def total_retransmits(sock: Any) -> int:
    """tcpi_total_retrans: the retransmissions before registration, which the series must not count."""
    info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LEN)
    return int.from_bytes(info[TCPI_TOTAL_RETRANS:TCPI_TOTAL_RETRANS + 4], sys.byteorder) if len(info) >= 104 else 0


class KernelTcpStats:
    def __init__(self, bpffs_dir: str | os.PathLike, cgroup: str | os.PathLike, state_dir: str | os.PathLike, *,
                 source_dir: str | os.PathLike | None = None, libbpf: Libbpf | None = None,
                 slots: int = abi.STATS_SLOTS, sockets: int = abi.STATS_SOCKETS,
                 loader_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bpffs_dir = Path(bpffs_dir)
        self.cgroup = str(cgroup)
        self.state_dir = Path(state_dir)
        self.source_dir = Path(source_dir) if source_dir else bpf_dir()
        self.slots = slots
        self.sockets = sockets
        self.loader_timeout = loader_timeout
        self.libbpf = libbpf
        self.compiled = False
        self._set: PinnedSet | None = None
        self._prog_fd: int | None = None
        self._prog_id = 0
        self._maps: dict[str, int] = {}
        self._attached = False
        self._series: dict[tuple[str, ...], int] = {}  # label values → slot (loop thread)
        self._labels: dict[int, tuple[str, ...]] = {}  # slot → label values (read by the admin thread)
        self._free = list(range(slots - 1, -1, -1))
        self._registered: collections.OrderedDict[int, int] = collections.OrderedDict()  # cookie → slot
        self._cpus = 1
        self.errors = 0
        self.exhausted = 0

    # ---- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        pins.ensure_bpffs(str(self.bpffs_dir))
        maps_name, set_name = pin_names(self.source_dir, self.slots, self.sockets)
        set_dir, maps_dir = self.bpffs_dir / set_name, self.bpffs_dir / maps_name
        flags = (f"-I{self.source_dir}", f"-DTCPMESH_STATS_SLOTS={self.slots}",
                 f"-DTCPMESH_STATS_SOCKETS={self.sockets}", f'-DTCPMESH_MAPS_DIR="{maps_dir}"')
        request = LoadRequest(source=str(self.source_dir / SOURCE_NAME), cflags=flags, state_dir=str(self.state_dir),
                              programs=(Program(PROGRAM, PROG_SOCK_OPS, ATTACH_SOCK_OPS),),
                              pin_to=PinTo(str(self.bpffs_dir), set_name, maps_name))
        self.compiled = adopt_or_pin(request, abi.MAPS, self.loader_timeout) is not None
        libbpf = self.libbpf = self.libbpf or Libbpf()
        self._set = PinnedSet.open(libbpf, set_dir, maps_dir, [PROGRAM], abi.MAPS)
        try:
            self._prog_fd, self._prog_id = self._set.prog_fd(PROGRAM), self._set.prog_ids[PROGRAM]
            self._maps = {name: self._set.map_fd(name) for name in abi.MAPS}  # a plain dict: the data path reads it
            self._cpus = libbpf.possible_cpus()
            self._attach()
        except BaseException:
            self.close()
            raise
        pins.prune(self.bpffs_dir, {set_name, maps_name}, (PIN_PREFIX,))

    def _attach(self) -> None:
        assert self.libbpf is not None and self._prog_fd is not None
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.libbpf.prog_attach(self._prog_fd, fd, ATTACH_SOCK_OPS, BPF_F_ALLOW_MULTI, f"{PROGRAM} on {self.cgroup}")
            self._attached = True
            attach.detach_named(self.libbpf, fd, ATTACH_SOCK_OPS, PROGRAM, self.cgroup, keep_ids=(self._prog_id,))
        finally:
            os.close(fd)

    def close(self) -> None:
        """Detach from the proxy's cgroup and close our fds; the pins stay. Idempotent."""
        if self._attached and self.libbpf is not None and self._prog_fd is not None:
            try:
                fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    self.libbpf.prog_detach(self._prog_fd, fd, ATTACH_SOCK_OPS, f"{PROGRAM} on {self.cgroup}")
                finally:
                    os.close(fd)
            except (OSError, AttachError) as exc:
                log.warning("kernel TCP stats: could not detach from %s: %s", self.cgroup, exc)
            self._attached = False
        if self._set is not None:
            self._set.close()
        self._set, self._prog_fd, self._maps = None, None, {}

    @property
    def loaded(self) -> bool:
        return bool(self._maps)

    # ---- data path (loop) -----------------------------------------------------------------------------
    def flow_started(self, flow: Flow, client_leg: Any, upstream_leg: Any) -> None:
        """Register the flow's two proxy sockets under its series (mesh flows only)."""
        if not self._maps or flow.security != SECURITY_MTLS:
            return
        if flow.reporter == REPORTER_SOURCE:
            legs = ((LEG_APP, client_leg), (LEG_TUNNEL, upstream_leg))
        else:
            legs = ((LEG_TUNNEL, client_leg), (LEG_APP, upstream_leg))
        labels = flow.metric_labels()
        for leg_name, leg in legs:
            try:
                sock = leg_socket(leg)
                if sock is None:
                    continue
                slot = self._slot((flow.reporter, leg_name, *(labels[n] for n in STATS_LABELS[2:])))
                if slot is None:
                    continue
                cookie = socket_cookie(sock)
                if self._registered.get(cookie) == slot:  # a pooled tunnel, registered by an earlier flow
                    self._registered.move_to_end(cookie)
                    continue
                entry = abi.StatsSock(slot=slot, retrans_seen=total_retransmits(sock))
                self.libbpf.map_update(self._maps[SOCKS], cookie.to_bytes(8, sys.byteorder), bytes(entry),
                                       SOCKS)  # type: ignore[union-attr]
                if leg_name == LEG_TUNNEL:  # only a tunnel's socket comes back (an app socket's cookie never
                    self._registered[cookie] = slot  # does): remembering those would hold 65,536 dead entries
                    if len(self._registered) > self.sockets:
                        self._registered.popitem(last=False)
            except (OSError, AttachError) as exc:
                self.errors += 1
                if self.errors == 1:
                    log.warning("kernel TCP stats: cannot register a %s socket (%s); counting and going on",
                                leg_name, exc)

    def _slot(self, values: tuple[str, ...]) -> int | None:
        slot = self._series.get(values)
        if slot is not None:
            return slot
        if not self._free:
            self.exhausted += 1
            return None
        slot = self._free.pop()
        zero = bytes(ctypes.sizeof(abi.TcpStats) * self._cpus)
        self.libbpf.map_update(self._maps[PAIRS], slot.to_bytes(4, sys.byteorder), zero, PAIRS)  # type: ignore
        self._series[values] = slot
        self._labels[slot] = values
        return slot

    # ---- control plane ---------------------------------------------------------------------------------
    def retain(self, workloads: Iterable[tuple[str, str]]) -> int:
        """Free the series of workloads (namespace, name) no longer in the registry; returns how many."""
        known = set(workloads)
        names = STATS_LABELS
        freed = set()
        for values, slot in list(self._series.items()):
            labels = dict(zip(names, values))
            sides = {(labels[f"{s}_workload_namespace"], labels[f"{s}_workload"]) for s in ("source", "destination")
                     if labels[f"{s}_workload"] != UNKNOWN}
            if not sides <= known:
                del self._series[values]
                del self._labels[slot]
                freed.add(slot)
        if freed and self._maps:
            self._forget_sockets(freed)
            self._free.extend(sorted(freed, reverse=True))
        return len(freed)

    def _forget_sockets(self, slots: set[int]) -> None:
        fd = self._maps[SOCKS]
        try:
            for key in self.libbpf.map_keys(fd, 8, SOCKS):  # type: ignore[union-attr]
                value = self.libbpf.map_lookup(fd, key, ctypes.sizeof(abi.StatsSock), SOCKS)  # type: ignore
                if value is not None and abi.StatsSock.from_buffer_copy(value).slot in slots:
                    self.libbpf.map_delete(fd, key, SOCKS)  # type: ignore[union-attr]
            for cookie in [c for c, slot in self._registered.items() if slot in slots]:
                del self._registered[cookie]
        except AttachError as exc:
            log.warning("kernel TCP stats: could not drop the sockets of removed series: %s", exc)

    # ---- scrape (admin thread) -----------------------------------------------------------------------
    def read(self) -> list[tuple[tuple[str, ...], abi.TcpStats]] | None:
        """Every series with its statistics summed over CPUs; None on any failed read (partial)."""
        maps = self._maps
        if not maps:
            return []
        size = ctypes.sizeof(abi.TcpStats)
        out = []
        for slot, values in list(self._labels.items()):
            try:
                raw = self.libbpf.map_lookup(maps[PAIRS], slot.to_bytes(4, sys.byteorder), size * self._cpus,
                                             PAIRS)  # type: ignore[union-attr]
            except AttachError:
                return None
            if raw is None:
                return None
            total = abi.TcpStats()
            for cpu in range(self._cpus):
                one = abi.TcpStats.from_buffer_copy(raw[cpu * size:(cpu + 1) * size])
                total.retransmits += one.retransmits
                total.rtt_samples += one.rtt_samples
                total.rtt_sum_us += one.rtt_sum_us
                for i in range(abi.RTT_BUCKETS):
                    total.rtt_buckets[i] += one.rtt_buckets[i]
            out.append((values, total))
        return out

    def counters(self) -> dict[str, int] | None:
        maps = self._maps
        if not maps:
            return {}
        return read_reason_counters(self.libbpf, maps[COUNTERS], REASON_NAMES, COUNTERS)  # type: ignore[arg-type]

    def collect(self):
        series = self.read()
        rtt = HistogramMetricFamily("tcpmesh_tcp_rtt_seconds", "Smoothed TCP RTT of the proxy's connections at "
                                    "each RTT measurement (sockops), per leg and identity pair", labels=STATS_LABELS)
        retransmits = CounterMetricFamily("tcpmesh_tcp_retransmits", "TCP retransmissions of the proxy's "
                                          "connections (sockops), per leg and identity pair", labels=STATS_LABELS)
        bounds = abi.bucket_upper_bounds_seconds()
        for values, stats in series or []:
            cumulative, buckets = 0, []
            for le, count in zip(bounds, stats.rtt_buckets):
                cumulative += count
                buckets.append((repr(le), cumulative))
            buckets.append(("+Inf", stats.rtt_samples))
            rtt.add_metric(values, buckets, stats.rtt_sum_us / 1e6)
            retransmits.add_metric(values, stats.retransmits)
        yield rtt
        yield retransmits
        events = CounterMetricFamily("tcpmesh_tcp_stats_events", "sockops callbacks of the kernel TCP stats, by "
                                     "reason (untracked: a socket tcpmesh did not register)", labels=("reason",))
        for reason, value in (self.counters() or {}).items():
            events.add_metric((reason,), value)
        yield events
        yield GaugeMetricFamily("tcpmesh_tcp_stats_series", "Series slots in use by the kernel TCP stats "
                                f"(of {self.slots})", value=len(self._labels))

    def describe(self):
        return []


def tcp_stats_from_config(config: Any, proxy_cgroup: Callable[[], str]) -> KernelTcpStats | None:
    """The kernel TCP stats ``telemetry.tcp_stats`` asks for, loaded and attached; None when off.

    ``auto`` (default): on when the capture mode uses eBPF; a failure is logged and the agent runs
    without them. ``on``: a failure stops the agent. ``off``: never. ``proxy_cgroup()`` names the agent's
    cgroup (where the program is attached); the composition root passes it.
    """
    mode = config.telemetry.tcp_stats
    if mode == "off" or (mode == "auto" and config.capture.mode == "none"):
        return None
    try:
        stats = KernelTcpStats(config.capture.bpffs_dir or pins.default_bpffs_dir(config.node.name), proxy_cgroup(),
                               config.state_dir)
        stats.load()
        return stats
    except Exception as exc:  # noqa: BLE001 — in auto mode any failure only costs the kernel stats
        if mode == "on":
            raise
        log.warning("kernel TCP stats are off: %s (set telemetry.tcp_stats: off to silence this)", exc)
        return None
