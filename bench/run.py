"""``python -m bench``: the one entry point of the benchmark (``make bench``, ``make bench BENCH_QUICK=1``).

Builds the world (bench/world.py), checks every path once, measures the load generator against a
known-good tool, then repeats: idle memory, ping-pong, latency under load (8 connections: the most
each path carries, then half the slowest tunnel's rate on every path), connection rate, bulk with 1
and 8 streams, 1,000 held connections, for every path (their order rotates per repetition so no path
always goes first), the capture test, the same-node scenario (client and server pods on node2) and
the database scenario (pgbench and redis-benchmark against real servers through every path). Then
it writes the JSON results, the chart and — for a full run, or
with --record — a section of docs/benchmarks.md. A test that fails is recorded and the run goes on;
the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import figures, host, scenarios, settings as S
from bench.world import World

REPO = Path(__file__).resolve().parents[1]
RESULTS_VERSION = 1
TESTS = ("rr", "rr_1cpu", "rr_nodes", "loadmax", "loadhalf", "crr", "bulk1", "bulk8", "hold")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short repetition (~1-2 min) for iteration")
    p.add_argument("--paths", default=",".join(S.PATHS), help=f"comma-separated subset of {','.join(S.PATHS)}")
    p.add_argument("--reps", type=int, dest="repetitions")
    p.add_argument("--bulk-seconds", type=float)
    p.add_argument("--rr-seconds", type=float)
    p.add_argument("--crr-seconds", type=float)
    p.add_argument("--crr-warmup", type=float)
    p.add_argument("--idle-connections", type=int)
    p.add_argument("--capture-connects", type=int)
    p.add_argument("--sockperf-seconds", type=float, help="0 skips the sockperf reference check")
    p.add_argument("--settle-seconds", type=float)
    p.add_argument("--no-same-node", dest="same_node", action="store_false", default=None,
                   help="skip the same-node scenario (client and server pods on one node)")
    p.add_argument("--no-databases", dest="databases", action="store_false", default=None,
                   help="skip the database scenario (pgbench and redis-benchmark through every path)")
    p.add_argument("--databases-only", action="store_true",
                   help="only the database scenario (and idle memory): for iterating on what pgbench and "
                        "redis-benchmark see; implies --no-same-node and no capture test or sockperf check")
    p.add_argument("--pgbench-seconds", type=float)
    p.add_argument("--redis-requests", type=int, help="requests per redis-benchmark run (each of SET and GET)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the JSON results and the chart go (default: bench/results and docs/ for a recorded "
                        "run, bench/out otherwise)")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record", dest="record", action="store_true", default=None,
                     help="append a section to docs/benchmarks.md (default for full runs)")
    rec.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after measuring, profile the tcpmesh agents with py-spy under bulk and connection load")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> S.Settings:
    base = S.QUICK if args.quick else S.FULL
    return S.with_overrides(base, repetitions=args.repetitions, bulk_seconds=args.bulk_seconds,
                            rr_seconds=args.rr_seconds, crr_seconds=args.crr_seconds, crr_warmup=args.crr_warmup,
                            idle_connections=args.idle_connections, capture_connects=args.capture_connects,
                            settle_seconds=args.settle_seconds,
                            same_node=False if args.databases_only else args.same_node,
                            sockperf_seconds=0 if args.databases_only else args.sockperf_seconds,
                            databases=True if args.databases_only else args.databases,
                            pgbench_seconds=args.pgbench_seconds, redis_requests=args.redis_requests)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_MAIN_PID = os.getpid()


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    # Libraries fork helpers (pyroute2 creates namespaces in a forked child and ends it with SIGTERM):
    # such a child must just die, never unwind into our cleanup and tear the lab down.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)  # unwinds through World.__exit__, so everything is cleaned up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(S.PATHS)
    if unknown or "direct" not in paths:
        print(f"--paths: unknown {sorted(unknown)}" if unknown else "--paths must include direct (ratios need it)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("python -m bench needs root (it builds a namespace lab and loads BPF programs)", file=sys.stderr)
        return 2
    record = args.record if args.record is not None else not (args.quick or args.databases_only)
    from bench import loadgen
    loadgen.require_tools(["iperf3"] + [p for p in paths if p in S.PEERS]
                          + (["sockperf"] if settings.sockperf_seconds > 0 else []))
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)

    started = datetime.datetime.now(datetime.timezone.utc)
    run_id = started.strftime("%Y%m%d-%H%M%S")
    results: dict = {
        "version": RESULTS_VERSION, "run_id": run_id, "date": started.isoformat(timespec="seconds"),
        "command": command_line(argv), "quick": args.quick, "settings": settings.to_json(),
        "machine": host.machine_facts(REPO), "paths": list(paths), "peers": [p for p in paths if p in S.PEERS],
        "raw": {p: [] for p in paths}, "capture_raw": [], "reference": None, "errors": [], "profile": None,
        "same_node_raw": [], "databases_raw": {p: [] for p in paths},
    }
    t0 = time.monotonic()
    try:
        with World(peers_wanted=tuple(p for p in paths if p in S.PEERS), log=log) as world:
            measure(world, settings, paths, results, args)
    except Exception as exc:  # the world could not be built or torn down: still write what we have
        results["errors"].append({"where": "world", "error": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc(limit=4)})
        log(f"ERROR {exc}")
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    finish(results, settings, args, record)
    return 1 if results["errors"] else 0


def command_line(argv: list[str] | None) -> str:
    words = [sys.executable if not sys.executable.startswith(str(REPO)) else os.path.relpath(sys.executable, REPO),
             "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
    text = shlex.join(words)
    if os.environ.get("MAKELEVEL"):
        quick = " BENCH_QUICK=1" if "--quick" in words else ""
        text = f"make bench{quick}  ({text})"
    return text


def measure(world: World, settings: S.Settings, paths: tuple[str, ...], results: dict,
            args: argparse.Namespace) -> None:
    for peer, problem in world.failed_peers.items():
        results["errors"].append({"where": "start", "path": peer, "error": problem})
        results.setdefault("dropped", []).append(peer)
    routes = world.paths(paths)
    preflight(world, settings, routes, results)
    live = [p for p in paths if p not in results.get("dropped", [])]
    if settings.sockperf_seconds > 0:
        try:
            results["reference"] = scenarios.reference_rr(world, routes["direct"], settings)
            ref = results["reference"]
            log(f"reference: 14-byte RTT p50 sockperf {ref['sockperf']['p50']:.1f} µs, loadgen {ref['loadgen']['p50']:.1f} µs")
        except Exception as exc:
            error(results, "reference", "direct", exc)
    dbs = start_databases(world, settings, results)
    try:
        repeat(world, settings, routes, live, results, dbs, tests=() if args.databases_only else TESTS,
               capture=not args.databases_only)
    finally:
        if dbs is not None:
            dbs.close()
    if args.profile is not None and "tcpmesh" in live:
        from bench import profile
        try:
            results["profile"] = profile.profile_agents(world, routes["tcpmesh"], settings, args.profile, log)
        except Exception as exc:
            error(results, "profile", "tcpmesh", exc, world)


def repeat(world: World, settings: S.Settings, routes: dict, live: list[str], results: dict, dbs,
           tests: tuple[str, ...] = TESTS, capture: bool = True) -> None:
    """The repetitions: every test on every live path (rotating order), capture, same node, databases."""
    meter = host.ForeignLoad([world.cgroup_root, world.plan.cgroup])
    for rep in range(settings.repetitions):
        order = live[rep % len(live):] + live[:rep % len(live)]
        reps = {p: {} for p in live}
        for p in live:
            reps[p]["idle"] = scenarios.idle_memory(routes[p])
        for test in tests:
            for p in order:
                label = f"rep {rep + 1}/{settings.repetitions} {test:5} {p:8}"
                try:
                    started = meter.start()
                    rate = figures.half_rate(reps) if test == "loadhalf" else None
                    if test == "loadhalf" and rate is None:
                        raise RuntimeError("no tunnel's maximum rate was measured in this repetition")
                    reps[p][test] = run_test(world, routes[p], test, settings, rate)
                    reps[p][test]["foreign_cores"] = round(meter.stop(started), 2)
                    log(f"{label} {describe(test, reps[p][test])} [others: {reps[p][test]['foreign_cores']:.1f} cores]")
                except Exception as exc:
                    error(results, f"rep {rep + 1} {test}", p, exc, world)
                    log(f"{label} FAILED: {exc}")
        for p in live:
            results["raw"][p].append(reps[p])
        if capture and "tcpmesh" in live:
            try:
                cap = scenarios.capture(world, settings, routes["tcpmesh"], routes["direct"])
                results["capture_raw"].append(cap)
                log(f"rep {rep + 1}/{settings.repetitions} capture: connect() p50 captured "
                    f"{cap['captured']['connect_us']['p50']:.1f} µs, straight {cap['straight']['connect_us']['p50']:.1f} µs "
                    f"({cap['overhead_pct']:+.1f} %)")
            except Exception as exc:
                error(results, f"rep {rep + 1} capture", "tcpmesh", exc, world)
        if settings.same_node and "tcpmesh" in live:
            results["same_node_raw"].append(measure_same_node(world, settings, rep, results))
        if dbs is not None:
            measure_databases(world, settings, rep, order, routes, results)


def start_databases(world: World, settings: S.Settings, results: dict):
    """PostgreSQL and Redis in the server pod for the database scenario, or None (skipped, or the
    servers could not start: recorded as an error, the rest of the run goes on)."""
    if not settings.databases:
        return None
    from bench.databases import Databases
    try:
        dbs = Databases(world)
        log("databases: PostgreSQL and Redis up in the server pod, pgbench tables initialised")
        return dbs
    except Exception as exc:
        error(results, "databases start", "direct", exc, world)
        log(f"databases could not start, scenario left out: {exc}")
        return None


def measure_databases(world: World, settings: S.Settings, rep: int, order: list[str], routes: dict,
                      results: dict) -> None:
    """One repetition of the database scenario: pgbench on every path, then redis-benchmark per client count."""
    from bench import databases

    reps: dict[str, dict] = {p: {} for p in order}
    meter = host.ForeignLoad([world.cgroup_root, world.plan.cgroup])
    tests = [("pgbench", None)] + [("redis", c) for c in settings.redis_clients]
    for test, clients in tests:
        for p in order:
            label = f"rep {rep + 1}/{settings.repetitions} {test}{'' if clients is None else f' -c {clients}'} {p:8}"
            try:
                started = meter.start()
                if test == "pgbench":
                    raw = reps[p]["pgbench"] = databases.pgbench(world, routes[p], settings)
                    text = f"{raw['tps']:.0f} tps (latency {raw['latency_ms']} ms)"
                else:
                    raw = reps[p].setdefault("redis", {})[str(clients)] = databases.redis(world, routes[p], settings,
                                                                                        clients)
                    text = ", ".join(f"{t} {v:.0f}/s" for t, v in raw["rps"].items())
                raw["foreign_cores"] = round(meter.stop(started), 2)
                log(f"{label} {text} [others: {raw['foreign_cores']:.1f} cores]")
            except Exception as exc:
                error(results, f"rep {rep + 1} {test}", p, exc, world)
                log(f"{label} FAILED: {exc}")
    for p in order:
        results["databases_raw"].setdefault(p, []).append(reps[p])


def measure_same_node(world: World, settings: S.Settings, rep: int, results: dict) -> dict:
    """One repetition of the same-node scenario: ping-pong and bulk, straight and through the agent."""
    routes = world.same_node_paths()
    names = list(routes)
    order = names[rep % 2:] + names[:rep % 2]
    out: dict[str, dict] = {name: {} for name in names}
    meter = host.ForeignLoad([world.cgroup_root, world.plan.cgroup])
    for test in figures.SAME_NODE_TESTS:
        for name in order:
            route = routes[name]
            label = f"rep {rep + 1}/{settings.repetitions} {test:5} {route.name}"
            try:
                started = meter.start()
                out[name][test] = run_test(world, route, test, settings)
                out[name][test]["foreign_cores"] = round(meter.stop(started), 2)
                log(f"{label} {describe(test, out[name][test])} [others: {out[name][test]['foreign_cores']:.1f} cores]")
            except Exception as exc:
                error(results, f"rep {rep + 1} same-node {test}", route.name, exc, world)
                log(f"{label} FAILED: {exc}")
    return out


def preflight(world: World, settings: S.Settings, routes: dict, results: dict) -> None:
    """One short exchange per path; a path that cannot carry it is dropped (and named as an error)."""
    probe = S.with_overrides(settings, rr_seconds=0.2)
    for name, route in routes.items():
        try:
            scenarios.rr(world, route, probe)
        except Exception as exc:
            error(results, "preflight", name, exc, world)
            results.setdefault("dropped", []).append(name)
            log(f"preflight {name} FAILED, dropped: {exc}")


def run_test(world: World, route, test: str, settings: S.Settings, rate: float | None = None) -> dict:
    if test in figures.RR_TESTS:
        return scenarios.rr(world, route, settings, layout=figures.RR_TESTS[test][1])
    if test == "loadmax":
        return scenarios.load(world, route, settings, 0)
    if test == "loadhalf":
        return scenarios.load(world, route, settings, rate or 0)
    if test == "crr":
        return scenarios.crr(world, route, settings)
    if test.startswith("bulk"):
        return scenarios.bulk(world, route, int(test[4:]), settings.bulk_seconds)
    if test == "hold":
        return scenarios.hold(world, route, settings)
    raise ValueError(test)


def describe(test: str, raw: dict) -> str:
    if test == "loadmax":
        return f"{raw['per_second']:.0f} exchanges/s on {raw['connections']} connections"
    if test == "loadhalf":
        return (f"at {raw['rate']:.0f}/s: p50 {raw['rtt_us']['p50']:.1f} µs p99 {raw['rtt_us']['p99']:.1f} µs "
                f"({raw['unfinished']} unfinished)")
    if test in figures.RR_TESTS:
        return f"p50 {raw['rtt_us']['p50']:.1f} µs p99 {raw['rtt_us']['p99']:.1f} µs"
    if test == "crr":
        return f"{raw['per_second']:.0f} conn/s (failed {raw['failed']}, p50 {raw['latency_us']['p50'] / 1000:.2f} ms)"
    if test.startswith("bulk"):
        return f"{raw['gbps']:.2f} Gbit/s, CPU generators {raw['generator_cpu_s']:.2f} s data path {raw['datapath_cpu_s']:.2f} s"
    if test == "hold":
        return (f"held {raw['held']}/{raw['requested']} in {raw['seconds']:.1f} s, data path RSS "
                f"{raw['memory']['rss_kib'] / 1024:.1f} MiB")
    return ""


def error(results: dict, where: str, path: str, exc: BaseException, world: World | None = None) -> None:
    entry = {"where": where, "path": path, "error": f"{type(exc).__name__}: {exc}"}
    if world is not None and path in ("stunnel", "haproxy"):
        entry["log_tail"] = world.peer_log_tail(path)
    results["errors"].append(entry)


# ------------------------------------------------------------------------------------------ output

def finish(results: dict, settings: S.Settings, args: argparse.Namespace, record: bool) -> None:
    from bench import report

    analyse(results, settings)
    run_id = results["run_id"]
    if args.out_dir is not None:
        json_dir = chart_dir = args.out_dir
    elif record:
        json_dir, chart_dir = REPO / "bench" / "results", REPO / "docs"
    else:
        json_dir = chart_dir = REPO / "bench" / "out"
    json_dir.mkdir(parents=True, exist_ok=True)
    chart_dir.mkdir(parents=True, exist_ok=True)
    json_path = json_dir / f"bench-{run_id}.json"
    chart_path = chart_dir / f"bench-{run_id}.png"
    if not args.no_chart:
        try:
            from bench import chart
            chart.render(results, chart_path)
            results["chart"] = str(chart_path)
        except ImportError as exc:
            log(f"no chart: {exc} (`make bench` installs the bench extra: pip install -e '.[bench]')")
        except Exception as exc:
            results["errors"].append({"where": "chart", "error": f"{type(exc).__name__}: {exc}"})
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"results: {json_path}")
    section = report.markdown(results, json_path=json_path, chart_path=results.get("chart"), docs_path=args.docs)
    (json_path.with_suffix(".md")).write_text(section)
    if record:
        report.append_to(args.docs, section)
        log(f"appended a section to {args.docs}")
    print(report.console_table(results))


def analyse(results: dict, settings: S.Settings) -> None:
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in results["paths"]}
    for rep in range(settings.repetitions):
        direct = results["raw"].get("direct", [])
        direct_raw = direct[rep] if rep < len(direct) else None
        for path in results["paths"]:
            reps = results["raw"].get(path, [])
            if rep >= len(reps):
                continue
            derived = figures.derive(reps[rep], direct_raw, has_datapath=path != "direct")
            for key, value in derived.items():
                samples[path].setdefault(key, []).append(value)
    results["samples"] = samples
    summary = figures.summaries(samples)
    results["summary"] = summary
    results["ratios"] = figures.ratios(summary, results["peers"])
    capture = None
    if results["capture_raw"]:
        capture = {
            "captured_p50_us": figures.summarize([c["captured"]["connect_us"]["p50"] for c in results["capture_raw"]]),
            "straight_p50_us": figures.summarize([c["straight"]["connect_us"]["p50"] for c in results["capture_raw"]]),
            "captured_p99_us": figures.summarize([c["captured"]["connect_us"]["p99"] for c in results["capture_raw"]]),
            "straight_p99_us": figures.summarize([c["straight"]["connect_us"]["p99"] for c in results["capture_raw"]]),
            "overhead_pct": figures.summarize([c["overhead_pct"] for c in results["capture_raw"]]),
            "connects": settings.capture_connects,
            "bpf_ns_per_connection": figures.summarize([c["bpf"]["ns_per_connection"] for c in results["capture_raw"]
                                                        if c.get("bpf")]),
            "bpf_programs": _bpf_programs(results["capture_raw"]),
            "lingered": sum(c["straight"]["lingered"] for c in results["capture_raw"]),
            "measured_pairs": min(min(c["captured"]["connect_us"]["count"], c["straight"]["connect_us"]["count"])
                                  for c in results["capture_raw"]),
        }
    results["capture"] = capture
    results["targets"] = figures.check_targets(summary, results["ratios"], capture, settings.idle_connections)
    results["same_node"] = figures.same_node(results["same_node_raw"]) if results.get("same_node_raw") else None
    results["databases"] = None
    if any(results.get("databases_raw", {}).values()):
        from bench import dbfigures
        results["databases"] = dbfigures.analyse(results["databases_raw"], results["paths"], results["peers"],
                                                 settings.pgbench_clients, settings.redis_clients)
    results["generator_check"] = generator_check(results)
    foreign = [t["foreign_cores"] for reps in results["raw"].values() for rep in reps for t in rep.values()
               if isinstance(t, dict) and "foreign_cores" in t]
    results["foreign_cores"] = figures.summarize(foreign)


def _bpf_programs(captures: list[dict]) -> dict[str, dict]:
    """Per program: median ns per run and runs per captured connection over the repetitions."""
    per: dict[str, dict[str, list[float]]] = {}
    for cap in captures:
        for name, entry in ((cap.get("bpf") or {}).get("programs") or {}).items():
            if entry.get("ns_per_run") is not None:
                per.setdefault(name, {"ns_per_run": [], "runs_per_connection": []})
                per[name]["ns_per_run"].append(entry["ns_per_run"])
                per[name]["runs_per_connection"].append(entry["runs_per_connection"])
    return {name: {k: figures.summarize(v)["median"] for k, v in lists.items()} for name, lists in per.items()}


def generator_check(results: dict) -> dict:
    """The load generator's own CPU share per test: far below one core means it was not the limit."""
    shares: dict[str, dict[str, float]] = {}
    for path, reps in results["raw"].items():
        for rep in reps:
            for test in ("rr", "crr"):
                if test in rep:
                    share = rep[test]["client_cpu_share"]
                    shares.setdefault(path, {})[test] = max(share, shares.get(path, {}).get(test, 0.0))
    return {"client_cpu_share_max": shares}
