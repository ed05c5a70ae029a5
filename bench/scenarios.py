"""One measurement of one path: bulk, ping-pong, connection rate, memory, and the capture test.

Each function runs the load generator(s) inside the lab, reads CPU from the cgroups of the roles
(client, server, data path) around the run, and returns a plain dict of raw results. Turning raw
results into figures is ``figures.derive``'s job.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time

from bench import bpfstats, host, loadgen, placement
from bench.settings import Settings
from bench.world import OUTBOUND_PORT, Path_, World


def _generator_cgroups(world: World, path: Path_) -> list[str]:
    return [path.client_cgroup, world.server_cgroup]


def bulk(world: World, path: Path_, streams: int, seconds: float) -> dict:
    server = world.start(loadgen.iperf3_server_argv(), world.server_pod.netns, world.server_cgroup,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        host.wait_listening(server, [loadgen.BULK_PORT], what="iperf3 -s")
        generators = host.cpu_snapshot(_generator_cgroups(world, path))
        datapath = host.cpu_snapshot(path.datapath_cgroups)
        started = time.monotonic()
        out = world.run(loadgen.iperf3_client_argv(path.bulk[0], path.bulk[1], seconds, streams),
                        path.client_netns, path.client_cgroup, timeout=loadgen.iperf3_seconds(seconds) + 30)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        wall = time.monotonic() - started
        result = loadgen.parse_iperf3(out)
        result.update(streams=streams, wall_s=wall, generator_cpu_s=host.cpu_seconds_since(generators),
                      datapath_cpu_s=host.cpu_seconds_since(datapath))
        return result
    finally:
        world.stop(server)


def rr(world: World, path: Path_, settings: Settings, size: int | None = None, layout: str = "free") -> dict:
    """A 1-byte (or ``size``) ping-pong on one connection, with the path's processes placed on the CPUs as
    ``layout`` says (bench/placement.py)."""
    server = host.cpu_snapshot([world.server_cgroup])
    datapath = host.cpu_snapshot(path.datapath_cgroups)
    with placement.placed(layout, [world.echo_server.pid], [host.cgroup_pids(cg) for cg in path.datapath_cgroups]):
        out = world.run(loadgen.rr_argv(world.binary, path.echo[0], path.echo[1], settings.rr_seconds,
                                        size or settings.rr_size),
                        path.client_netns, path.client_cgroup, timeout=settings.rr_seconds + 30)
    result = loadgen.parse_json_line(out, "loadgen rr")
    result["layout"] = layout
    result.update(server_cpu_s=host.cpu_seconds_since(server), datapath_cpu_s=host.cpu_seconds_since(datapath),
                  client_cpu_share=(result["cpu_user"] + result["cpu_sys"]) / max(result["seconds"], 1e-9))
    return result


def load(world: World, path: Path_, settings: Settings, rate: float) -> dict:
    """Latency under load: ``rate`` 0 measures the most the path carries (closed loop), a rate > 0
    the round-trip times at that offered load (open loop)."""
    datapath = host.cpu_snapshot(path.datapath_cgroups)
    out = world.run(loadgen.load_argv(world.binary, path.echo[0], path.echo[1], settings.rr_seconds, settings.rr_size,
                                      settings.load_connections, rate),
                    path.client_netns, path.client_cgroup, timeout=settings.rr_seconds + 30)
    result = loadgen.parse_json_line(out, "loadgen load")
    if result["completed"] == 0:
        raise RuntimeError(f"no exchange completed through {path.name} at rate {rate:g}")
    result.update(datapath_cpu_s=host.cpu_seconds_since(datapath),
                  client_cpu_share=(result["cpu_user"] + result["cpu_sys"]) / max(result["seconds"], 1e-9))
    return result


def crr(world: World, path: Path_, settings: Settings) -> dict:
    server = host.cpu_snapshot([world.server_cgroup])
    datapath = host.cpu_snapshot(path.datapath_cgroups)
    out = world.run(loadgen.crr_argv(world.binary, path.echo[0], path.echo[1], settings.crr_seconds,
                                     settings.crr_concurrency, settings.crr_size, settings.crr_warmup),
                    path.client_netns, path.client_cgroup, timeout=settings.crr_seconds + settings.crr_warmup + 30)
    result = loadgen.parse_json_line(out, "loadgen crr")
    if result["completed"] == 0:
        raise RuntimeError(f"no connection completed through {path.name} ({result['failed']} failed, "
                           f"{result['connect_errors']} connect errors, {result['abandoned']} still in flight at "
                           "the end: connections that hang)")
    result.update(server_cpu_s=host.cpu_seconds_since(server), datapath_cpu_s=host.cpu_seconds_since(datapath),
                  client_cpu_share=(result["cpu_user"] + result["cpu_sys"]) / max(result["seconds_all"], 1e-9))
    return result


def idle_memory(path: Path_) -> dict:
    return host.memory_kib(path.datapath_cgroups)


def hold(world: World, path: Path_, settings: Settings) -> dict:
    """Open ``idle_connections`` through the path, each with one exchange; sample memory; close them."""
    proc = world.start(loadgen.hold_argv(world.binary, path.echo[0], path.echo[1], settings.idle_connections),
                       path.client_netns, path.client_cgroup, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    try:
        line = _read_line(proc, timeout=150)
        result = json.loads(line)
        if result["held"] == 0:
            raise RuntimeError(f"no connection could be held open through {path.name}")
        time.sleep(settings.settle_seconds)
        result["memory"] = host.memory_kib(path.datapath_cgroups)
        result["generator_memory"] = host.memory_kib([path.client_cgroup])
        proc.stdin.close()
        proc.wait(timeout=30)
        return result
    finally:
        world.stop(proc)
        time.sleep(settings.settle_seconds)  # let the tunnels finish closing before the next test


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{proc.args[1]} printed nothing within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{proc.args[1]} exited ({proc.wait()}) before it was ready: {err.strip()[-400:]}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def capture(world: World, settings: Settings, tcpmesh: Path_, direct: Path_) -> dict:
    """connect() latency through the eBPF connect path vs straight to the outbound proxy port.

    Like with like: both variants create their sockets in the client pod's cgroup, so both meet the
    same programs (the pod's connect4, sockops, cgroup_skb and the guard it inherits) and reach the
    same listener over the same veth; the only difference is the capture work. Captured: connect to
    the server pod, which connect4 records and rewrites to the proxy on node1; then one byte
    through the tunnel, and close. Straight: connect to <pod gateway>:15001 itself, which connect4
    leaves alone (the redirect address is never captured); the proxy, finding no original
    destination, closes it. Only connect() is timed, with BPF run-time statistics off. One
    ``loadgen connect2`` process alternates the two connect by connect, so whatever else loads
    the machine hits both alike. (``direct`` is unused since both variants run from the pod.)

    Then, with run-time statistics on, a short run of each variant alone gives the kernel's own
    run time of the tcpmesh programs per captured and per straight connection; their difference
    is what the capture itself costs in BPF.
    """
    captured_v = (tcpmesh.echo[0], tcpmesh.echo[1], tcpmesh.client_cgroup, "exchange")
    straight_v = (world.plan.pod_gateway, OUTBOUND_PORT, tcpmesh.client_cgroup, "eof")

    def run(a: tuple, b: tuple, count: int, max_seconds: float) -> dict:
        argv = loadgen.connect2_argv(world.binary, a, b, count, max_seconds)
        out = world.run(argv, tcpmesh.client_netns, tcpmesh.client_cgroup, timeout=max_seconds + 30)
        result = loadgen.parse_json_line(out, "loadgen connect2")
        for key in ("a", "b"):
            if result[key]["connect_us"]["count"] == 0:
                raise RuntimeError(f"no connect of variant {a[3] if key == 'a' else b[3]} succeeded "
                                   f"({result[key]['failed']} failed)")
        return result

    run(captured_v, straight_v, max(10, settings.capture_connects // 10), max_seconds=3.0)  # warm-up
    measured = run(captured_v, straight_v, settings.capture_connects, settings.capture_max_seconds)
    result: dict = {"captured": measured["a"], "straight": measured["b"], "seconds": measured["seconds"],
                    "same_cgroup": True}
    result.update(_bpf_per_variant(world, tcpmesh, settings, run, captured_v, straight_v))
    captured, straight = result["captured"]["connect_us"], result["straight"]["connect_us"]
    result["overhead_pct"] = (captured["p50"] / straight["p50"] - 1) * 100
    result["overhead_p99_pct"] = (captured["p99"] / straight["p99"] - 1) * 100
    return result


def _bpf_per_variant(world: World, tcpmesh: Path_, settings: Settings, run, captured_v: tuple,
                     straight_v: tuple) -> dict:
    """BPF run time per connection of each variant alone (``bpf``: captured, ``bpf_straight``), and
    ``bpf_capture_ns_per_connection``, the difference. ``bpf_pod_capture_ns_per_connection`` is that
    difference for the pod's own programs only (connect4, the guard, sockops, cgroup_skb,
    getpeername): the capture work proper, without the proxy-side programs (telemetry, the
    getsockopt hook) that run more often for the captured variant only because its connection
    carries an exchange through the tunnel. Empty values where statistics are unavailable."""
    out: dict = {"bpf": None, "bpf_straight": None, "bpf_capture_ns_per_connection": None,
                 "bpf_pod_capture_ns_per_connection": None}
    names = _capture_programs(world, tcpmesh)
    if not names:
        return out
    pod_names = set(_capture_programs(world, tcpmesh, proxy=False).values())
    pairs = max(25, settings.capture_connects // 4)  # connect2 makes two connects per pair
    with bpfstats.enabled() as stats_on:
        if not stats_on:
            return out
        for key, variant in (("bpf", captured_v), ("bpf_straight", straight_v)):
            before = bpfstats.snapshot(names)
            rounds = run(variant, variant, pairs, max_seconds=5.0)
            out[key] = _bpf_summary([bpfstats.delta(names, before, bpfstats.snapshot(names))],
                                    [rounds["a"], rounds["b"]])
    if out["bpf"] and out["bpf_straight"]:
        out["bpf_capture_ns_per_connection"] = round(out["bpf"]["ns_per_connection"]
                                                     - out["bpf_straight"]["ns_per_connection"], 1)
        pod = [sum(e["ns"] for n, e in out[k]["programs"].items() if n in pod_names) / out[k]["connections"]
               for k in ("bpf", "bpf_straight") if out[k]["connections"]]
        if len(pod) == 2:
            out["bpf_pod_capture_ns_per_connection"] = round(pod[0] - pod[1], 1)
    return out


def _capture_programs(world: World, tcpmesh: Path_, proxy: bool = True) -> dict[int, str]:
    """The tcpmesh programs a captured connection meets: the pod cgroup's (and the guard it inherits)
    and, with ``proxy``, those on node1's agent cgroup (the getsockopt hook, which answers the
    proxy's origin lookup, and the proxy's sockops)."""
    if not bpfstats.available():
        return {}
    try:
        return bpfstats.programs([tcpmesh.client_cgroup] + ([world.node1.agent_cgroup] if proxy else []))
    except (RuntimeError, OSError, ValueError):
        return {}


def _bpf_summary(runs: list[dict], captured_rounds: list[dict]) -> dict | None:
    """BPF run time per connection of ``captured_rounds`` (one variant), summed over the runs (None without stats)."""
    if not runs:
        return None
    programs: dict[str, dict] = {}
    for run in runs:
        for name, entry in run.items():
            total = programs.setdefault(name, {"ns": 0, "runs": 0})
            total["ns"] += entry["ns"]
            total["runs"] += entry["runs"]
    connections = sum(r["connect_us"]["count"] for r in captured_rounds)
    for entry in programs.values():
        entry["ns_per_run"] = round(entry["ns"] / entry["runs"], 1) if entry["runs"] else None
        entry["runs_per_connection"] = round(entry["runs"] / connections, 2) if connections else None
    total_ns = sum(e["ns"] for e in programs.values())
    return {"programs": programs, "connections": connections,
            "ns_per_connection": round(total_ns / connections, 1) if connections else None}


def reference_rr(world: World, direct: Path_, settings: Settings, size: int = 14) -> dict:
    """sockperf (a known-good tool) against loadgen on the direct path, same message size."""
    server = world.start(loadgen.sockperf_server_argv(), world.server_pod.netns, world.server_cgroup,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        host.wait_listening(server, [loadgen.SOCKPERF_PORT], what="sockperf server")
        out = world.run(loadgen.sockperf_client_argv(direct.echo[0], loadgen.SOCKPERF_PORT, settings.sockperf_seconds,
                                                     size),
                        direct.client_netns, direct.client_cgroup, timeout=settings.sockperf_seconds + 30)
        sockperf = loadgen.parse_sockperf(out)
    finally:
        world.stop(server)
    mine = rr(world, direct, settings, size=size)
    return {"size": size, "sockperf": sockperf, "loadgen": {"p50": mine["rtt_us"]["p50"], "p99": mine["rtt_us"]["p99"]}}
