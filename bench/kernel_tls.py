"""``python -m bench.kernel_tls``: the agent itself with kernel TLS against user-space TLS (issue #19).

Runs where the kernel has ``CONFIG_TLS``: inside a Debian 12 guest of the VM tier (bench/kernel_tls_vm.py
boots it; this host has no kernel TLS) or natively on such a host. Root.

Two labs side by side (bench/world.py: the bench's own world, the code ``tcpmesh lab up`` runs), the same
but for one setting of their agents, given as environment variables (the agent's TCPMESH_* layer) per
``--variant``; stunnel (bench/peers.py) beside the first. Each repetition runs every path once, in an
order that rotates per repetition (A and B interleaved, so the machine's load falls on both):

- ``loadgen rr`` (1 byte, bench/loadgen.c) from client pod n1p1 to server pod n2p1 through ``direct`` (the
  first lab's routed path), each variant's tcpmesh and ``stunnel``, every process of the measured path (client,
  both nodes' data path, echo server) on the first CPU (bench/placement.py ``1cpu``) and every other process
  of both labs parked on the other CPUs: p50, p99, and the data path's CPU per round trip (both agents',
  or both stunnels', cgroup ``cpu.stat``; warm-up round trips included);
- a checked bulk transfer (bench/checked_bulk.py: ``--bulk-bytes`` random bytes, half-close, the server
  answers SHA-256 and length): whether it arrived whole, and the data path's CPU per MB.

After the repetitions, ``ss -tnie`` in each lab's node namespaces counts the tunnel sockets with the kernel's
``tls`` ULP (proof of which TLS each variant really ran). Prints one JSON document on stdout; progress on
stderr. ``summarise`` (pure) turns runs into added latencies and ratios; bench/kernel_tls_vm.py uses it too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import time
from typing import Iterator

from bench import host, loadgen, placement, scenarios
from bench.settings import Settings
from bench.world import Path_, World

CHECK_PORT = loadgen.BULK_PORT   # stunnel's layout carries this port too (its "bulk" service)
WARMUP_ROUND_TRIPS = 200         # loadgen rr's, before it times anything (bench/loadgen.c)
PROGRESS_PREFIX = "kernel_tls: "
FIRST = "tcpmesh-user"
KERNEL = "tcpmesh-ktls"
# the agents' TLS setting, proxy.kernel_tls: user space vs kernel TLS both ways (docs/config.md)
DEFAULT_VARIANTS = (f"{FIRST}:TCPMESH_PROXY_KERNEL_TLS=off", f"{KERNEL}:TCPMESH_PROXY_KERNEL_TLS=on")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    environment: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``NAME`` or ``NAME:VAR=VALUE,VAR=VALUE``: a lab whose agents start with those variables."""
        name, _, assignments = text.partition(":")
        pairs = []
        for item in filter(None, assignments.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("TCPMESH_"):
                raise ValueError(f"--variant {text!r}: {item!r} is not TCPMESH_<NAME>=VALUE")
            pairs.append((key, value))
        if not name.startswith("tcpmesh") or name in ("direct", "stunnel"):
            raise ValueError(f"--variant {text!r}: a variant's name starts with 'tcpmesh' (e.g. tcpmesh-ktls)")
        return cls(name, tuple(pairs))


@contextlib.contextmanager
def agent_environment(pairs) -> Iterator[None]:
    """The lab starts its agents with this process's environment: set ``pairs`` while one lab comes up."""
    saved = {key: os.environ.get(key) for key, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lab_pids(worlds) -> list[int]:
    """Every process of the labs and of the bench's own cgroups (agents, issuers, peers, servers)."""
    pids = []
    for world in worlds:
        for root in (world.plan.cgroup, world.cgroup_root):
            for directory, _dirs, files in os.walk(root):
                if "cgroup.procs" in files:
                    pids += host.cgroup_pids(directory)
    return pids


def park(worlds) -> None:
    """Every process of both labs onto the CPUs the measurement does not use (the first is its own)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        placement.pin(lab_pids(worlds), set(cpus[1:]))


def rr(world: World, path: Path_, settings: Settings, layout: str) -> dict:
    raw = scenarios.rr(world, path, settings, layout=layout)
    rtt = raw["rtt_us"]
    round_trips = rtt["count"] + WARMUP_ROUND_TRIPS
    return {"p50": rtt["p50"], "p99": rtt["p99"], "mean": rtt["mean"], "round_trips": rtt["count"],
            "datapath_cpu_us_per_rt": raw["datapath_cpu_s"] * 1e6 / round_trips,
            "server_cpu_us_per_rt": raw["server_cpu_s"] * 1e6 / round_trips,
            "client_cpu_us_per_rt": (raw["cpu_user"] + raw["cpu_sys"]) * 1e6 / round_trips, "layout": layout}


def checked_bulk(world: World, path: Path_, size: int) -> dict:
    target = world.address(path, "bulk", CHECK_PORT)
    datapath = host.cpu_snapshot(path.datapath_cgroups)
    out = world.run([sys.executable, "-m", "bench.checked_bulk", "send", target[0], str(target[1]), str(size)],
                    path.client_netns, path.client_cgroup, timeout=900)
    result = loadgen.parse_json_line(out, "checked_bulk send")
    cpu = host.cpu_seconds_since(datapath)
    result.update(datapath_cpu_s=cpu, datapath_cpu_ms_per_mb=cpu * 1e3 / (size / 1e6),
                  mbit_per_s=size * 8 / 1e6 / max(result["seconds"], 1e-9))
    return result


def tls_ulp_sockets(world: World) -> dict[str, list[str]]:
    """node → the ``ss -tnie`` lines of its sockets that carry the kernel's ``tls`` ULP."""
    from agent.lab.nsenter import run_in_netns

    found = {}
    for node in (world.node1, world.node2):
        done = run_in_netns(node.netns, subprocess.run, ["ss", "-tnie"], capture_output=True, text=True)
        found[node.name] = [line.strip() for line in done.stdout.splitlines() if "tcp-ulp-tls" in line]
    return found


def start_check_server(world: World) -> None:
    server = world.start([sys.executable, "-m", "bench.checked_bulk", "serve", str(CHECK_PORT)],
                         world.server_pod.netns, world.server_cgroup, stdout=subprocess.DEVNULL)
    host.wait_listening(server, [CHECK_PORT], timeout=120, what="bench.checked_bulk serve")


def facts() -> dict:
    return {"kernel": platform.release(), "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "cpus": sorted(os.sched_getaffinity(0)), "tls_module": os.path.isdir("/sys/module/tls")}


def measure(opts: argparse.Namespace, log) -> dict:
    variants = [Variant.parse(v) for v in opts.variant or DEFAULT_VARIANTS]
    settings = Settings(rr_seconds=opts.rr_seconds, rr_size=1)
    out = {"facts": facts(), "variants": {v.name: dict(v.environment) for v in variants},
           "settings": {"reps": opts.reps, "rr_seconds": opts.rr_seconds, "bulk_bytes": opts.bulk_bytes,
                        "layout": opts.layout},
           "rr": [], "bulk": [], "ulp": {}, "errors": []}
    try:
        _measure(opts, variants, settings, out, log)
    except RuntimeError as exc:   # a lab that does not go down (agents slow to stop under emulation) keeps the runs
        out["errors"].append(f"teardown or setup: {exc}")
    return out


def _measure(opts, variants, settings, out: dict, log) -> None:
    with contextlib.ExitStack() as stack:
        worlds: dict[str, World] = {}
        for i, variant in enumerate(variants):
            with agent_environment(variant.environment):
                worlds[variant.name] = stack.enter_context(
                    World(peers_wanted=("stunnel",) if i == 0 and not opts.no_stunnel else (), log=log,
                          ready_timeout=opts.ready_timeout))
            start_check_server(worlds[variant.name])
        first = worlds[variants[0].name]
        paths: dict[str, tuple[World, Path_]] = {"direct": (first, first.paths(("direct",))["direct"])}
        for variant in variants:
            tcpmesh = worlds[variant.name].paths(("tcpmesh",))["tcpmesh"]
            paths[variant.name] = (worlds[variant.name], dataclasses.replace(tcpmesh, name=variant.name))
        if "stunnel" in first.peer_layouts:
            paths["stunnel"] = (first, first.paths(("stunnel",))["stunnel"])
        elif not opts.no_stunnel:
            out["errors"].append(f"stunnel left out: {first.failed_peers.get('stunnel', 'not installed')}")
        names = list(paths)
        out["paths"] = names
        for rep in range(opts.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                world, path = paths[name]
                park(worlds.values())
                load = os.getloadavg()
                try:
                    row = rr(world, path, settings, opts.layout)
                except RuntimeError as exc:
                    out["errors"].append(f"rep {rep} rr {name}: {exc}")
                    log(f"rep {rep} rr {name} failed: {str(exc)[-300:]}")
                    continue
                row.update(rep=rep, path=name, guest_loadavg=load)
                out["rr"].append(row)
                log(f"rep {rep} rr {name}: p50 {row['p50']:.1f} us, p99 {row['p99']:.1f}, "
                    f"data path {row['datapath_cpu_us_per_rt']:.1f} us CPU/rt")
            for name in order if opts.bulk_bytes else ():
                world, path = paths[name]
                try:
                    row = checked_bulk(world, path, opts.bulk_bytes)
                except RuntimeError as exc:
                    out["errors"].append(f"rep {rep} bulk {name}: {exc}")
                    log(f"rep {rep} bulk {name} failed: {str(exc)[-300:]}")
                    continue
                row.update(rep=rep, path=name)
                out["bulk"].append(row)
                log(f"rep {rep} bulk {name}: match {row['match']}, {row['mbit_per_s']:.0f} Mbit/s, "
                    f"data path {row['datapath_cpu_ms_per_mb']:.1f} ms CPU/MB")
        for variant in variants:
            out["ulp"][variant.name] = tls_ulp_sockets(worlds[variant.name])
        out["facts"]["tls_module_after"] = os.path.isdir("/sys/module/tls")
        log(f"errors so far: {out['errors']}; tls ULP sockets: {json.dumps(out['ulp'])}")


# ------------------------------------------------------------------------------------------ figures (pure)

def _median(values):
    values = list(values)
    return statistics.median(values) if values else None


def added(rr_rows: list[dict]) -> list[dict]:
    """Each non-direct run with its added p50 and p99: minus the direct path's of the same repetition
    (and boot, when rows carry one)."""
    direct = {(r.get("boot"), r["rep"]): r for r in rr_rows if r["path"] == "direct"}
    rows = []
    for r in rr_rows:
        base = direct.get((r.get("boot"), r["rep"]))
        if r["path"] == "direct" or base is None:
            continue
        rows.append({**r, "added_p50": r["p50"] - base["p50"], "added_p99": r["p99"] - base["p99"]})
    return rows


def ratio_pairs(paths: list[str]) -> list[tuple[str, str]]:
    """Every later tcpmesh variant against the first; every tcpmesh variant against stunnel."""
    variants = [p for p in paths if p.startswith("tcpmesh")]
    pairs = [(v, variants[0]) for v in variants[1:]]
    if "stunnel" in paths:
        pairs += [(v, "stunnel") for v in variants]
    return pairs


def summarise(rr_rows: list[dict], bulk_rows: list[dict], paths: list[str]) -> dict:
    """Medians per path (added p50/p99, CPU per round trip, bulk CPU per MB) and, per pair of paths, the
    median, min and max over repetitions of the ratio A ÷ B within one repetition (A and B measured
    minutes apart at most, under the same load)."""
    rows = added(rr_rows)
    per_path = {}
    for name in paths:
        mine = [r for r in rr_rows if r["path"] == name]
        plus = [r for r in rows if r["path"] == name]
        bulk = [b for b in bulk_rows if b["path"] == name]
        per_path[name] = {"runs": len(mine), "p50": _median(r["p50"] for r in mine),
                          "p99": _median(r["p99"] for r in mine),
                          "added_p50": _median(r["added_p50"] for r in plus),
                          "added_p99": _median(r["added_p99"] for r in plus),
                          "datapath_cpu_us_per_rt": _median(r["datapath_cpu_us_per_rt"] for r in mine),
                          "bulk_runs": len(bulk), "bulk_all_match": all(b["match"] for b in bulk) if bulk else None,
                          "bulk_datapath_cpu_ms_per_mb": _median(b["datapath_cpu_ms_per_mb"] for b in bulk),
                          "bulk_mbit_per_s": _median(b["mbit_per_s"] for b in bulk)}
    ratios = {}
    keyed = {(r.get("boot"), r["rep"], r["path"]): r for r in rows}
    keyed_bulk = {(b.get("boot"), b["rep"], b["path"]): b for b in bulk_rows}
    for a, b in ratio_pairs(paths):
        entry = {}
        for figure, table in (("added_p50", keyed), ("added_p99", keyed), ("datapath_cpu_us_per_rt", keyed),
                              ("bulk_datapath_cpu_ms_per_mb", keyed_bulk)):
            field = "datapath_cpu_ms_per_mb" if figure.startswith("bulk_") else figure
            values = [table[(boot, rep, a)][field] / table[(boot, rep, b)][field]
                      for (boot, rep, path) in table if path == a and (boot, rep, b) in table
                      and table[(boot, rep, b)][field] > 0]
            if values:
                entry[figure] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                 "n": len(values)}
        ratios[f"{a} / {b}"] = entry
    return {"paths": per_path, "ratios": ratios}


def report(summary: dict) -> str:
    lines = ["path           p50      p99   added p50  added p99   CPU/rt (us)  bulk CPU ms/MB  bulk ok"]
    for name, row in summary["paths"].items():
        def f(value, width=9):
            return f"{value:{width}.1f}" if value is not None else " " * (width - 1) + "-"
        lines.append(f"{name:13} {f(row['p50'])} {f(row['p99'])} {f(row['added_p50'], 11)} {f(row['added_p99'], 10)} "
                     f"{f(row['datapath_cpu_us_per_rt'], 13)} {f(row['bulk_datapath_cpu_ms_per_mb'], 15)}  "
                     f"{row['bulk_all_match']}")
    for pair, entry in summary["ratios"].items():
        words = ", ".join(f"{figure} x{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}, n={v['n']})"
                          for figure, v in entry.items())
        lines.append(f"{pair}: {words}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_tls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append",
                        help=f"NAME:TCPMESH_<VARIABLE>=VALUE,... one lab per variant (default: {' and '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rr-seconds", type=float, default=4.0)
    parser.add_argument("--bulk-bytes", type=int, default=8_000_000, help="0: no checked bulk transfer")
    parser.add_argument("--layout", default="1cpu", choices=placement.LAYOUTS)
    parser.add_argument("--no-stunnel", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds for each lab's agents to be ready")
    parser.add_argument("--progress", help="also append each progress line to this file (a guest: /dev/ttyS0)")
    opts = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        if opts.progress:   # a serial port: no controlling tty, never wait for its carrier or a full buffer
            with contextlib.suppress(OSError):
                fd = os.open(opts.progress, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK)
                try:
                    os.write(fd, "".join(f"{PROGRESS_PREFIX}{line}\n" for line in message.splitlines()).encode())
                finally:
                    os.close(fd)
    started = time.monotonic()
    out = measure(opts, log)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["summary"] = summarise(out["rr"], out["bulk"], out.get("paths", []))
    log(report(out["summary"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
