"""What the benchmark reads from (and sets on) the host: cgroup CPU time, resident memory,
per-netns sysctls, listening sockets, and the facts about the machine a report names.

CPU time comes from cgroup v2 ``cpu.stat`` (``usage_usec`` exists without the cpu controller),
so a multi-process data path is counted whole. Memory is the sum over a cgroup's processes of
``Rss`` (and ``Pss``, which does not double-count pages shared between worker processes) from
``/proc/<pid>/smaps_rollup``.
"""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Iterable

from agent.lab.nsenter import run_in_netns

TCP_LISTEN = "0A"


def cpu_usec(cgroup: str) -> int:
    """Microseconds of CPU used by every process that ever ran in ``cgroup`` (and its children)."""
    for line in Path(cgroup, "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"{cgroup}/cpu.stat has no usage_usec")


def cpu_snapshot(cgroups: Iterable[str]) -> dict[str, int]:
    return {cg: cpu_usec(cg) for cg in cgroups}


def cpu_seconds_since(snapshot: dict[str, int]) -> float:
    return sum(cpu_usec(cg) - before for cg, before in snapshot.items()) / 1e6


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How many cores processes outside ``own_cgroups`` kept busy between ``start`` and ``stop``: the
    other tenants of a shared machine. Kernel work done in interrupt context for our own traffic is
    not charged to any cgroup, so this slightly overstates foreign load during network-heavy tests."""

    def __init__(self, own_cgroups: Iterable[str]) -> None:
        self.own = list(own_cgroups)

    def start(self) -> tuple[float, float, int]:
        return time.monotonic(), machine_busy_seconds(), sum(cpu_usec(cg) for cg in self.own)

    def stop(self, started: tuple[float, float, int]) -> float:
        t0, busy0, own0 = started
        wall = time.monotonic() - t0
        foreign = (machine_busy_seconds() - busy0) - (sum(cpu_usec(cg) for cg in self.own) - own0) / 1e6
        return max(0.0, foreign / wall) if wall > 0 else 0.0


def cgroup_pids(cgroup: str) -> list[int]:
    try:
        return [int(p) for p in Path(cgroup, "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def memory_kib(cgroups: Iterable[str]) -> dict:
    """{"rss_kib", "pss_kib", "processes"} summed over every process of ``cgroups``."""
    rss = pss = count = 0
    for cgroup in cgroups:
        for pid in cgroup_pids(cgroup):
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            count += 1
            for line in text.splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_kib": rss, "pss_kib": pss, "processes": count}


def set_netns_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key with / for .>`` inside ``netns`` (net.* sysctls are per namespace)."""
    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", key.replace(".", "/")).write_text(value)
    run_in_netns(netns, write)


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket (v4 or v6) listens on ``port`` in the network namespace of process ``pid``."""
    lines: list[str] = []
    for table in ("tcp", "tcp6"):
        try:
            lines += Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            return False
    for line in lines:
        fields = line.split()
        if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


def wait_listening(proc: subprocess.Popen, ports: Iterable[int], timeout: float = 10.0, what: str = "") -> None:
    ports = list(ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args[0]} exited with status {proc.returncode} before listening "
                               f"on {ports}")
        if all(listening(proc.pid, port) for port in ports):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what or proc.args[0]} is not listening on {ports} after {timeout:.0f} s")


# --------------------------------------------------------------------------------------- machine facts

def _first_line(argv: list[str], starts: str = "") -> str:
    """The first line of ``argv``'s output (stdout, then stderr) that starts with ``starts``."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    return next((line for line in lines if line.lower().startswith(starts.lower())), "unknown")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _module_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed
        return None


def machine_facts(repo: Path) -> dict:
    """What a reader needs to compare this run with another: cores, kernel, Python, tools, commit."""
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no", "--", "agent", "bpf"))
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": _module_version("uvloop"),
        "stunnel": _first_line(["stunnel", "-version"], "stunnel "),
        "haproxy": _first_line(["haproxy", "-v"], "haproxy version").split(" - ")[0],
        "iperf3": _first_line(["iperf3", "--version"], "iperf "),
        "sockperf": _first_line(["sockperf", "--version"], "sockperf"),
        "commit": commit + ("+uncommitted changes in agent/ or bpf/" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }
