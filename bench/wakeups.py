"""``python -m bench.wakeups``: system calls, context switches and CPU per 1-byte round trip, per data path.

What docs/performance-latency.md ("Wake-ups and system calls per round trip") counts with. The bench's
own world (bench/world.py: a two-node lab with real agents, stunnel beside it), a ``loadgen rr``
ping-pong from the client pod to the server pod through each path in turn, and, in a window in the
middle of each run (after the warm-up, before the end):

- ``perf stat -a --for-each-cgroup``: system calls by kind (``syscalls:sys_enter_*`` tracepoints),
  context switches and task clock of each data-path cgroup (node1's and node2's agent, or stunnel's
  two processes) and of the client, whose ``write`` count is the number of round trips in the window
  (``loadgen rr`` makes exactly one ``write`` and one ``read`` per exchange);
- ``/proc/PID/task/*/{stat,status}`` of every data-path process before and after the window:
  voluntary and involuntary context switches and CPU ticks per thread, so a thread other than the
  event loop that wakes per message shows;
- with ``--sequence``, ``strace -f -tt`` of each node's process for a fraction of a second after the
  window: the system calls of a few consecutive hops, in order.

Counts do not depend on the machine's load (unlike times). Needs root and ``perf`` (and ``strace``
for ``--sequence``). Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bpfstats, loadgen
from bench.world import World

SYSCALLS = ("read", "write", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "poll", "ppoll", "select", "pselect6", "futex", "getpid", "ioctl",
            "setsockopt", "getsockopt", "timerfd_settime", "clock_nanosleep", "nanosleep", "sched_yield",
            "mmap", "munmap", "madvise", "brk", "mprotect", "getrusage", "openat", "close", "fstat",
            "newfstatat", "lseek", "statx", "rt_sigprocmask", "sendmmsg", "recvmmsg", "shutdown",
            "accept4", "connect", "socket", "getsockname", "getpeername", "pipe2", "eventfd2")
EXTRA_EVENTS = ("raw_syscalls:sys_enter", "context-switches", "task-clock", "page-faults", "cpu-migrations")


def _name(cgroup: str) -> str:
    """node1 for a lab agent's cgroup (<lab>/node1/agent), the leaf's name otherwise."""
    leaf = os.path.basename(cgroup)
    return os.path.basename(os.path.dirname(cgroup)) if leaf == "agent" else leaf


def _relative(cgroup: str, mount: str) -> str:
    return os.path.relpath(cgroup, mount)


def perf_window(cgroups: list[str], mount: str, seconds: float) -> dict[str, dict[str, float]]:
    """{cgroup: {event: count}} over ``seconds``, system wide, per cgroup."""
    events = [*EXTRA_EVENTS, *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)]
    available = set(Path("/sys/kernel/tracing/events/syscalls").iterdir()) if Path(
        "/sys/kernel/tracing/events/syscalls").is_dir() else None
    if available is not None:
        names = {p.name for p in available}
        events = [e for e in events if not e.startswith("syscalls:") or e.split(":", 1)[1] in names]
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as out:
        argv = ["perf", "stat", "-a", "-x", ";", "-o", out.name, "--for-each-cgroup",
                ",".join(_relative(c, mount) for c in cgroups), "-e", ",".join(events), "--", "sleep", f"{seconds:g}"]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"perf stat failed: {done.stderr.strip()[-400:]}")
        text = out.read()
    return parse_perf_csv(text, {_relative(c, mount): c for c in cgroups})


def parse_perf_csv(text: str, cgroups: dict[str, str]) -> dict[str, dict[str, float]]:
    """``perf stat -x ';' --for-each-cgroup`` output → {cgroup: {event: count}}, for the cgroups named in
    ``cgroups`` (perf's relative name → the caller's name). A syscall tracepoint's event name is the
    syscall's; "<not counted>" (no such event in the window) is 0."""
    result: dict[str, dict[str, float]] = {c: {} for c in cgroups.values()}
    for line in text.splitlines():
        parts = line.split(";")
        if len(parts) < 4 or line.startswith("#"):
            continue
        value, event, cgroup = parts[0], parts[2], parts[3]
        if cgroup not in cgroups:
            continue
        try:
            count = float(value)
        except ValueError:
            count = 0.0
        result[cgroups[cgroup]][event.replace("syscalls:sys_enter_", "")] = count
    return result


def per_round_trip(counts: dict[str, float], round_trips: float) -> dict[str, float]:
    """Every non-zero count ÷ ``round_trips``, and ``other_syscalls``: the system calls of no listed kind."""
    row = {k: v / round_trips for k, v in counts.items() if v}
    listed = sum(v for k, v in counts.items() if k not in EXTRA_EVENTS)
    row["other_syscalls"] = (counts.get("raw_syscalls:sys_enter", 0.0) - listed) / round_trips
    return row


def cgroup_pids(cgroup: str) -> list[int]:
    pids: list[int] = []
    for root, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            pids += [int(p) for p in Path(root, "cgroup.procs").read_text().split()]
    return pids


def threads(pids: list[int]) -> dict[tuple[int, int], dict]:
    """{(pid, tid): {comm, voluntary, involuntary, ticks}} for every thread of ``pids``."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                status = Path(base, "status").read_text()
                stat = Path(base, "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            fields = stat.rsplit(")", 1)[1].split()
            values = dict(re.findall(r"^(\w+):\s+(\S+)", status, re.M))
            out[(pid, int(tid))] = {"comm": values.get("Name", "?"),
                                   "voluntary": int(values["voluntary_ctxt_switches"]),
                                   "involuntary": int(values["nonvoluntary_ctxt_switches"]),
                                   "ticks": int(fields[11]) + int(fields[12])}
    return out


def thread_deltas(before: dict, after: dict, round_trips: float) -> list[dict]:
    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    for key, now in sorted(after.items()):
        was = before.get(key, {"voluntary": 0, "involuntary": 0, "ticks": 0})
        rows.append({"pid": key[0], "tid": key[1], "comm": now["comm"],
                     "voluntary_per_rt": (now["voluntary"] - was["voluntary"]) / round_trips,
                     "involuntary_per_rt": (now["involuntary"] - was["involuntary"]) / round_trips,
                     "cpu_us_per_rt": (now["ticks"] - was["ticks"]) / hz * 1e6 / round_trips})
    return rows


def cpu_split(cgroups) -> dict[str, tuple[int, int]]:
    """{cgroup: (user_usec, system_usec)} from cgroup v2 cpu.stat."""
    out = {}
    for cg in cgroups:
        values = dict(line.split() for line in Path(cg, "cpu.stat").read_text().splitlines())
        out[cg] = (int(values["user_usec"]), int(values["system_usec"]))
    return out


def client_writes(pid: int) -> int:
    """The ``write`` system calls ``pid`` has made (/proc/PID/io syscw): its round trips so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no syscw")


def profile(cgroup: str, mount: str, seconds: float) -> dict:
    """``perf record -e cpu-clock`` of ``cgroup`` for ``seconds``: {"dso": [(shared object, share)],
    "symbols": perf report's lines by shared object and symbol, with sample counts}."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        done = subprocess.run(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", "4000", "-G",
                               _relative(cgroup, mount), "-o", data, "--", "sleep", f"{seconds:g}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"perf record failed: {done.stderr.strip()[-400:]}")
        text = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso", "-q"],
                              capture_output=True, text=True).stdout
        symbols = subprocess.run(["perf", "report", "-i", data, "--stdio", "-n", "--sort", "dso,sym", "-q"],
                                 capture_output=True, text=True).stdout.splitlines()[:120]
    dsos = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%"):
            dsos.append((parts[1], float(parts[0].rstrip("%")) / 100))
    return {"dso": dsos, "symbols": symbols}


def lab_programs(world: World, cgroups: list[str]) -> dict[int, str]:
    """id → name of every tcpmesh BPF program on the data path: effective on ``cgroups`` or on a tc hook
    of one of the lab's network namespaces."""
    from agent.lab.nsenter import run_in_netns

    found = bpfstats.programs(cgroups)
    for netns in {n.netns for n in world.plan.nodes} | {p.netns for p in world.plan.pods}:
        done = run_in_netns(netns, subprocess.run, ["bpftool", "-j", "net", "show"], capture_output=True, text=True)
        for block in json.loads(done.stdout or "[]"):
            for hook in block.get("tc", []):
                if hook.get("name", "").startswith("tcpmesh"):
                    found[hook["id"]] = f"{hook['name']} (tc {hook.get('kind', '')} {hook.get('devname', '')})"
    return found


def sequence(pid: int, seconds: float) -> list[str]:
    """``strace -f -tt`` of ``pid`` for ``seconds``: its system calls in order (clock reads left out)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        proc = subprocess.Popen(["strace", "-f", "-tt", "-qq", "-s", "16", "-o", out.name, "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        return out.read().splitlines()


def measure(world: World, path, mount: str, window: float, with_sequence: bool, with_profile: bool) -> dict:
    """One ``loadgen rr`` through ``path``; the counts of the window in its middle."""
    seconds = window + 8.0 + (2.0 if with_sequence else 0.0) + (3.0 if with_profile else 0.0)
    proc = world.start(loadgen.rr_argv(world.binary, path.echo[0], path.echo[1], seconds, 1),
                       path.client_netns, path.client_cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        pids = {cg: cgroup_pids(cg) for cg in path.datapath_cgroups}
        all_pids = [p for ps in pids.values() for p in ps]
        bpf_cgroups = [path.client_cgroup, *path.datapath_cgroups, world.client_pod.cgroup, world.server_pod.cgroup]
        programs = lab_programs(world, bpf_cgroups)
        bpf_before = bpfstats.snapshot(programs)
        before, cpu_before, writes_before = threads(all_pids), cpu_split(path.datapath_cgroups), client_writes(proc.pid)
        counts = perf_window([path.client_cgroup, *path.datapath_cgroups], mount, window)
        after, cpu_after, writes_after = threads(all_pids), cpu_split(path.datapath_cgroups), client_writes(proc.pid)
        bracket_rts = max(writes_after - writes_before, 1)
        bpf = {name: {"runs_per_rt": d["runs"] / bracket_rts, "ns_per_rt": d["ns"] / bracket_rts}
               for name, d in bpfstats.delta(programs, bpf_before, bpfstats.snapshot(programs)).items() if d["runs"]}
        dsos = {}
        for cg in path.datapath_cgroups if with_profile else ():
            start = client_writes(proc.pid)
            found = profile(cg, mount, 1.5)
            found["round_trips"] = client_writes(proc.pid) - start
            dsos[_name(cg)] = found
        traces = {}
        if with_sequence:
            for cg, ps in pids.items():
                traces[os.path.basename(cg)] = {str(p): sequence(p, 0.25) for p in ps}
        out, err = proc.communicate(timeout=seconds + 30)
    finally:
        world.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen rr through {path.name} exited {proc.returncode}: {err.strip()[-400:]}")
    rr = loadgen.parse_json_line(out, "loadgen rr")
    round_trips = counts[path.client_cgroup].get("write", 0.0)
    if round_trips <= 0:
        raise RuntimeError(f"no round trip through {path.name} in the window")
    per_rt = {cg: per_round_trip(counts[cg], round_trips) for cg in path.datapath_cgroups}
    return {"path": path.name, "round_trips": round_trips, "rr_p50_us": rr["rtt_us"]["p50"],
            "per_round_trip": per_rt, "threads": thread_deltas(before, after, bracket_rts), "sequence": traces,
            "cpu_us_per_rt": {cg: {"user": (cpu_after[cg][0] - cpu_before[cg][0]) / bracket_rts,
                                   "system": (cpu_after[cg][1] - cpu_before[cg][1]) / bracket_rts}
                              for cg in path.datapath_cgroups},
            "profile": dsos, "bpf": bpf}


def report(result: dict) -> str:
    lines = [f"== {result['path']}: {result['round_trips']:.0f} round trips in the window, "
             f"rr p50 {result['rr_p50_us']:.1f} µs (whole run)"]
    for cg, row in result["per_round_trip"].items():
        name = _name(cg)
        total = row.get("raw_syscalls:sys_enter", 0.0)
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row.items(), key=lambda kv: -kv[1])
                          if k not in EXTRA_EVENTS and v >= 0.01)
        lines.append(f"  {name}: syscalls {total:.2f}/rt, context switches {row.get('context-switches', 0):.2f}/rt, "
                     f"task clock {row.get('task-clock', 0) * 1000:.1f} µs/rt")
        lines.append(f"    {kinds}")
        cpu = result["cpu_us_per_rt"][cg]
        lines.append(f"    CPU (cgroup cpu.stat) user {cpu['user']:.1f} + system {cpu['system']:.1f} µs/rt")
    for t in result["threads"]:
        if t["voluntary_per_rt"] or t["involuntary_per_rt"] or t["cpu_us_per_rt"]:
            lines.append(f"  thread {t['pid']}/{t['tid']} {t['comm']}: voluntary {t['voluntary_per_rt']:.3f}/rt, "
                         f"involuntary {t['involuntary_per_rt']:.3f}/rt, cpu {t['cpu_us_per_rt']:.1f} µs/rt (ticks)")
    for name, d in sorted(result["bpf"].items()):
        lines.append(f"  bpf {name}: {d['runs_per_rt']:.2f} runs/rt, {d['ns_per_rt'] / 1000:.2f} µs/rt")
    for name, found in result["profile"].items():
        lines.append(f"  profile {name}: " + ", ".join(f"{dso} {share:.0%}" for dso, share in found["dso"][:8]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from agent.host import checks

    parser = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=4.0, help="seconds counted in each run (default 4)")
    parser.add_argument("--paths", default="tcpmesh,stunnel", help="comma-separated: tcpmesh, stunnel, haproxy")
    parser.add_argument("--repeat", type=int, default=1, help="runs per path, alternating (default 1)")
    parser.add_argument("--sequence", action="store_true", help="also strace a few hops of each node's process")
    parser.add_argument("--profile", action="store_true", help="also perf-record each data-path cgroup (by DSO)")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)
    wanted = tuple(p for p in args.paths.split(",") if p)
    mount = checks.find_cgroup2_mount()
    results = []
    with bpfstats.enabled(), World(peers_wanted=tuple(p for p in wanted if p != "tcpmesh"), log=lambda m: print(m, file=sys.stderr)) as world:
        paths = world.paths(wanted)
        for _ in range(args.repeat):
            for name in wanted:
                result = measure(world, paths[name], mount, args.window, args.sequence, args.profile)
                print(report(result), flush=True)
                results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
