"""``python -m bench --profile DIR``: where the tcpmesh agents spend their CPU under load (py-spy).

After the measured repetitions (so the sampler never distorts a figure), py-spy samples every
process of both agents' cgroups while a bulk test (8 streams) and a connection-rate test run
through tcpmesh. Raw collapsed stacks go to DIR (``<scenario>-<node>-<pid>.txt``, loadable by
speedscope or flamegraph.pl); ``summarize`` turns them into the top functions by own and
inclusive samples, which also go into the results JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import bpfstats, scenarios
from bench.settings import Settings

RATE = 250  # samples per second
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(found):
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]' (make bench does)")
    return found


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.split("/work/main/", 1)[-1]
    return f"{match.group('func')} ({path})"


def summarize(raw_text: str, top: int = 15) -> dict:
    """Top functions by own samples and by inclusive samples from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    def pct(counter):
        return [{"function": name, "samples": n, "pct": round(100 * n / total, 1)} for name, n in counter.most_common(top)]
    return {"samples": total, "own": pct(own), "inclusive": pct(inclusive)}


def thread_cpu(pids: list[tuple[str, int]]) -> dict[str, dict[int, float]]:
    """CPU seconds so far of every thread of the given processes: {"<node>-<pid>": {tid: seconds}}."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[int, float]] = {}
    for node, pid in pids:
        threads = {}
        for task in Path(f"/proc/{pid}/task").iterdir() if Path(f"/proc/{pid}/task").exists() else []:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            threads[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        out[f"{node}-{pid}"] = threads
    return out


def user_system_cpu(pids: list[tuple[str, int]]) -> dict[str, tuple[float, float]]:
    """CPU seconds so far of each whole process, split into user and kernel time: {"<node>-<pid>": (user, system)}.

    The split says where a bulk byte's cost lies: in the kernel (TCP, the copies in and out of
    sockets, wake-ups) or in user space (TLS, Python, copies between buffers)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for node, pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[f"{node}-{pid}"] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def user_system_per_gb(before: dict, after: dict, gigabytes: float) -> dict[str, dict[str, float]]:
    """Per process: user and kernel CPU seconds per GB relayed between two ``user_system_cpu`` readings."""
    out = {}
    for proc, (user, system) in after.items():
        user0, system0 = before.get(proc, (user, system))
        out[proc] = {"user_s_per_gb": round((user - user0) / max(gigabytes, 1e-9), 3),
                     "system_s_per_gb": round((system - system0) / max(gigabytes, 1e-9), 3)}
    return out


def thread_split(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per process: CPU seconds of the main (event-loop) thread and of all other threads together."""
    split = {}
    for proc, threads in after.items():
        pid = int(proc.rsplit("-", 1)[1])
        deltas = {tid: cpu - before.get(proc, {}).get(tid, 0.0) for tid, cpu in threads.items()}
        split[proc] = {"loop_thread_s": round(deltas.get(pid, 0.0), 2),
                       "other_threads_s": round(sum(v for t, v in deltas.items() if t != pid), 2),
                       "threads": len(threads)}
    return split


def _record(pids: list[tuple[str, int]], seconds: float, out_dir: Path, scenario: str) -> list[tuple[Path, subprocess.Popen]]:
    procs = []
    for node, pid in pids:
        out = out_dir / f"{scenario}-{node}-{pid}.txt"
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE), "--duration", str(max(1, round(seconds))),
                "--format", "raw", "--output", str(out), "--nonblocking", "--subprocesses"]
        procs.append((out, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    time.sleep(0.5)  # let py-spy attach before the load starts
    return procs


def _collect(procs: list[tuple[Path, subprocess.Popen]], timeout: float) -> dict[str, dict]:
    found = {}
    for out, proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        if out.exists():
            found[out.name] = summarize(out.read_text())
        else:
            found[out.name] = {"error": (err or "no output").strip()[-400:]}
    return found


def profile_agents(world, route, settings: Settings, out_dir: Path, log) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    pids = [(node.name, pid) for node in (world.node1, world.node2)
            for pid in scenarios.host.cgroup_pids(node.agent_cgroup)]
    if not pids:
        raise RuntimeError("no agent processes to profile")
    result = {"dir": str(out_dir), "rate": RATE, "scenarios": {}}
    seconds = max(3.0, settings.bulk_seconds)
    result["bpf"] = bpf_cost(world, route, settings, seconds)
    log(f"profile: py-spy on {len(pids)} agent process(es) during bulk (8 streams) and connection-rate load")
    procs = _record(pids, seconds, out_dir, "bulk8")
    cpu_before, split_before = thread_cpu(pids), user_system_cpu(pids)
    bulk = scenarios.bulk(world, route, 8, seconds)
    threads = thread_split(cpu_before, thread_cpu(pids))
    per_gb = user_system_per_gb(split_before, user_system_cpu(pids), bulk["bytes"] / 1e9)
    result["scenarios"]["bulk8"] = {"load": {"gbps": round(bulk["gbps"], 2)}, "threads": threads,
                                    "user_system_per_gb": per_gb, "stacks": _collect(procs, seconds + 30)}
    crr_settings = dataclasses.replace(settings, crr_seconds=seconds, crr_warmup=0.0)
    procs = _record(pids, seconds, out_dir, "crr")
    cpu_before = thread_cpu(pids)
    crr = scenarios.crr(world, route, crr_settings)
    threads = thread_split(cpu_before, thread_cpu(pids))
    result["scenarios"]["crr"] = {"load": {"per_second": round(crr["per_second"])}, "threads": threads,
                                  "stacks": _collect(procs, seconds + 30)}
    text = render(result)
    (out_dir / "summary.txt").write_text(text)
    log(f"profile: {out_dir / 'summary.txt'}")
    return result


def bpf_cost(world, route, settings: Settings, seconds: float) -> dict | None:
    """Kernel run time of every tcpmesh BPF program of both nodes per GB of bulk and per new connection
    (no py-spy running: the figures are the kernel's own)."""
    if not bpfstats.available():
        return None
    cgroups = [route.client_cgroup, world.node1.agent_cgroup, world.node2.agent_cgroup, world.server_pod.cgroup]
    names = bpfstats.programs(cgroups)
    out = {}
    with bpfstats.enabled() as on:
        if not on or not names:
            return None
        before = bpfstats.snapshot(names)
        bulk = scenarios.bulk(world, route, 8, seconds)
        programs = bpfstats.delta(names, before, bpfstats.snapshot(names))
        out["bulk8"] = {"gigabytes": round(bulk["bytes"] / 1e9, 3), "programs": programs,
                        "ms_per_gb": round(sum(p["ns"] for p in programs.values()) / 1e6 / (bulk["bytes"] / 1e9), 3)}
        before = bpfstats.snapshot(names)
        crr = scenarios.crr(world, route, dataclasses.replace(settings, crr_seconds=seconds, crr_warmup=0.0))
        programs = bpfstats.delta(names, before, bpfstats.snapshot(names))
        out["crr"] = {"connections": crr["completed_all"], "programs": programs,
                      "us_per_connection": round(sum(p["ns"] for p in programs.values()) / 1e3
                                                 / max(1, crr["completed_all"]), 2)}
    return out


def render(result: dict) -> str:
    lines = []
    for scenario, data in (result.get("bpf") or {}).items():
        cost = f"{data['ms_per_gb']} ms per GB" if "ms_per_gb" in data else f"{data['us_per_connection']} µs per connection"
        lines.append(f"== BPF run time during {scenario} (both nodes, all tcpmesh programs): {cost}")
        lines += [f"   {name:18} {p['runs']:>9} runs  {p['ns_per_run'] or 0:>8} ns/run" for name, p in
                  sorted(data["programs"].items(), key=lambda kv: -kv[1]["ns"]) if p["runs"]]
        lines.append("")
    for scenario, data in result["scenarios"].items():
        lines.append(f"== {scenario} (load while sampled: {data['load']})")
        for proc, split in data.get("threads", {}).items():
            lines.append(f"   CPU {proc}: event-loop thread {split['loop_thread_s']} s, {split['threads'] - 1} other "
                         f"thread(s) {split['other_threads_s']} s")
        for proc, cost in data.get("user_system_per_gb", {}).items():
            lines.append(f"   CPU per GB {proc} (sampler running): user {cost['user_s_per_gb']} s, "
                         f"kernel {cost['system_s_per_gb']} s")
        for name, summary in data["stacks"].items():
            if "error" in summary:
                lines.append(f"-- {name}: {summary['error']}")
                continue
            lines.append(f"-- {name}: {summary['samples']} samples at {result['rate']}/s")
            lines.append("   own time:")
            lines += [f"   {row['pct']:5.1f} %  {row['function']}" for row in summary["own"]]
            lines.append("   inclusive (frames on every stack left out):")
            lines += [f"   {row['pct']:5.1f} %  {row['function']}" for row in summary["inclusive"] if row["pct"] < 99.0]
        lines.append("")
    return "\n".join(lines)
