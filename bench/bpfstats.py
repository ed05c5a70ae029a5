"""How long the capture's BPF programs run: the kernel's own per-program run time (``run_time_ns``).

``enabled()`` turns run-time statistics on with the ``BPF_ENABLE_STATS`` syscall, which keeps them on
only while its file descriptor is open (so a crash cannot leave them on, unlike the
``kernel.bpf_stats_enabled`` sysctl). ``snapshot`` reads ``run_time_ns``/``run_cnt`` of the programs
attached (effectively, i.e. also inherited) to some cgroups with bpftool.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import subprocess
from typing import Iterable, Iterator

BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
NR_BPF = {"x86_64": 321, "aarch64": 280}


@contextlib.contextmanager
def enabled() -> Iterator[bool]:
    """Run-time statistics on for the duration of the block; yields False where they cannot be enabled."""
    nr = NR_BPF.get(platform.machine())
    fd = -1
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint8 * 128)()  # union bpf_attr, .enable_stats.type = BPF_STATS_RUN_TIME (0)
        fd = libc.syscall(nr, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def _bpftool(*args: str) -> object:
    """bpftool's JSON answer; None when it printed nothing (`cgroup show` of a cgroup without programs prints an
    empty line). A failure says bpftool's error, which -j prints on stdout as {"error": ...}."""
    done = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=10)
    text = done.stdout.strip()
    if done.returncode != 0:
        raise RuntimeError(f"bpftool {' '.join(args)}: {done.stderr.strip() or text}")
    return json.JSONDecoder().raw_decode(text)[0] if text else None


def programs(cgroups: Iterable[str]) -> dict[int, str]:
    """id → name of every tcpmesh program effective on ``cgroups``."""
    found = {}
    for cgroup in cgroups:
        for prog in _bpftool("cgroup", "show", cgroup, "effective") or []:
            if prog.get("name", "").startswith("tcpmesh_"):
                found[prog["id"]] = prog["name"]
    return found


def snapshot(prog_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """id → (run_time_ns, run_cnt)."""
    out = {}
    for prog_id in prog_ids:
        info = _bpftool("prog", "show", "id", str(prog_id))
        out[prog_id] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out


def delta(names: dict[int, str], before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict:
    """Per program name: total ns, runs and ns per run between two snapshots (names may repeat: summed)."""
    out: dict[str, dict] = {}
    for prog_id, name in names.items():
        ns = after[prog_id][0] - before[prog_id][0]
        runs = after[prog_id][1] - before[prog_id][1]
        entry = out.setdefault(name, {"ns": 0, "runs": 0})
        entry["ns"] += ns
        entry["runs"] += runs
    for entry in out.values():
        entry["ns_per_run"] = round(entry["ns"] / entry["runs"], 1) if entry["runs"] else None
    return out


def available() -> bool:
    return shutil.which("bpftool") is not None
