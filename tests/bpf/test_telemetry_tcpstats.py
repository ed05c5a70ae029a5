"""Kernel TCP stats (bpf/tcp_stats.c) on a node/pod netns pair: a registered socket's RTT samples and
retransmits land in its series and only there; closing forgets the socket; removed series free
their slot; the program is adopted from its pins without compiling and detaches cleanly."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from agent.lab.nsenter import listen_in_netns
from agent.connection import flow as F
from tests.bpf.bpfworld import NODE_IP, socket_in

PORT_CLEAN, PORT_LOSSY = 7301, 7302


class FakeLeg:
    def __init__(self, sock) -> None:
        self._sock = sock

    def socket(self):
        return self._sock


def a_flow(src: str, dst: str) -> F.Flow:
    flow = F.Flow(F.REPORTER_SOURCE, security=F.SECURITY_MTLS)
    flow.source_workload, flow.source_namespace, flow.source_principal = src, "t", f"spiffe://td/ns/t/sa/{src}"
    flow.destination_workload, flow.destination_namespace = dst, "t"
    flow.destination_principal = f"spiffe://td/ns/t/sa/{dst}"
    return flow


def sink(listener: socket.socket) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1 << 16):
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def series(stats, src: str, dst: str, leg: str = "app"):
    for values, totals in stats.read():
        if values[:3] == ("source", leg, src) and values[5] == dst:
            return totals
    return None


@pytest.fixture
def stats(bpffs_dir, test_cgroup, tmp_path):
    from agent.telemetry.tcpstats import KernelTcpStats

    kts = KernelTcpStats(bpffs_dir, test_cgroup, tmp_path)
    kts.load()
    try:
        yield kts
    finally:
        kts.close()


def test_rtt_and_retransmits_land_in_the_registered_series_only(stats, topology, test_cgroup):
    # Loss on the receiving side (a drop in the sender's own OUTPUT is re-sent as new data, not
    # retransmitted): 10 % of the data segments to PORT_LOSSY vanish on the way in.
    nft = ["ip", "netns", "exec", topology.node_ns, "nft"]
    subprocess.run([*nft, "add table ip tmloss"], check=True)
    subprocess.run([*nft, "add chain ip tmloss pre { type filter hook prerouting priority 0 ; }"], check=True)
    subprocess.run([*nft, f"add rule ip tmloss pre tcp dport {PORT_LOSSY} meta length > 200 "
                          "numgen random mod 100 < 10 drop"], check=True)
    clean_listener = listen_in_netns(topology.node_ns, (NODE_IP, PORT_CLEAN))
    lossy_listener = listen_in_netns(topology.node_ns, (NODE_IP, PORT_LOSSY))
    threads = [sink(clean_listener), sink(lossy_listener)]
    payload = b"x" * (1 << 20)
    for port, (src, dst) in ((PORT_CLEAN, ("clean", "db")), (PORT_LOSSY, ("lossy", "db"))):
        client = socket_in(topology.ns_path(topology.pod_ns), test_cgroup)
        client.settimeout(30)
        client.connect((NODE_IP, port))
        stats.flow_started(a_flow(src, dst), FakeLeg(client), FakeLeg(None))
        for _ in range(32):  # losses are random: send until one was retransmitted (1 MiB at a time)
            client.sendall(payload)
            time.sleep(0.02)
            if port == PORT_CLEAN or series(stats, src, dst).retransmits:
                break
        client.close()
    for thread in threads:
        thread.join(30)
    clean_listener.close()
    lossy_listener.close()
    clean, lossy = series(stats, "clean", "db"), series(stats, "lossy", "db")
    assert clean is not None and lossy is not None, stats.read()
    for totals in (clean, lossy):
        assert totals.rtt_samples > 0 and sum(totals.rtt_buckets) == totals.rtt_samples
        assert totals.rtt_sum_us > 0
    assert clean.retransmits == 0
    assert lossy.retransmits > 0
    time.sleep(0.2)  # both sockets went through TCP_CLOSE
    counters = stats.counters()
    assert counters["forgotten"] >= 2 and counters["enabled"] >= 2


def test_removed_series_free_their_slot_zeroed_and_pins_are_adopted(stats, bpffs_dir, test_cgroup, tmp_path,
                                                                     topology):
    from agent.telemetry.tcpstats import KernelTcpStats

    listener = listen_in_netns(topology.node_ns, (NODE_IP, PORT_CLEAN))
    thread = sink(listener)
    client = socket_in(topology.ns_path(topology.pod_ns), test_cgroup)
    client.connect((NODE_IP, PORT_CLEAN))
    stats.flow_started(a_flow("gone", "db"), FakeLeg(client), FakeLeg(None))
    client.sendall(b"y" * 100_000)
    client.close()
    thread.join(10)
    listener.close()
    assert series(stats, "gone", "db").rtt_samples > 0
    assert stats.retain([("t", "db")]) == 1  # "gone" left the registry
    assert series(stats, "gone", "db") is None
    text = "".join(str(m) for m in stats.collect())
    assert "gone" not in text
    again = KernelTcpStats(bpffs_dir, test_cgroup, tmp_path)
    again.load()  # the same pins: adopted, no compile
    try:
        assert not again.compiled
    finally:
        again.close()
