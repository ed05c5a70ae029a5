"""The load generators: bench/loadgen.c (compiled per run), iperf3 for bulk, sockperf as a reference.

``build`` compiles loadgen.c with the host's C compiler into the run's work directory. The
``*_argv`` helpers are pure; ``parse_*`` turn each tool's output into plain dicts.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")
ECHO_PORT = 7001
BULK_PORT = 5201
SOCKPERF_PORT = 11111
IPERF3_BLOCK = "128K"


class ToolMissing(RuntimeError):
    pass


def require_tools(names: list[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise ToolMissing(f"missing {', '.join(missing)}: `make bench` installs them "
                          "(deploy/bootstrap-debian.sh: stunnel4 haproxy iperf3 sockperf gcc)")


def build(workdir: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ToolMissing("no C compiler (cc/gcc) to build bench/loadgen.c: apt-get install gcc")
    out = workdir / "loadgen"
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(out), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE} failed:\n{done.stderr}")
    return out


def serve_argv(binary: Path, port: int = ECHO_PORT) -> list[str]:
    return [str(binary), "serve", str(port)]


def rr_argv(binary: Path, host: str, port: int, seconds: float, size: int) -> list[str]:
    return [str(binary), "rr", host, str(port), f"{seconds:g}", str(size)]


def load_argv(binary: Path, host: str, port: int, seconds: float, size: int, connections: int,
              rate: float) -> list[str]:
    """Ping-pong on ``connections`` connections: rate 0 closed loop (the most the path carries), else
    open loop at ``rate`` requests/s, latency counted from when each request was due."""
    return [str(binary), "load", host, str(port), f"{seconds:g}", str(size), str(connections), f"{rate:.1f}"]


def crr_argv(binary: Path, host: str, port: int, seconds: float, concurrency: int, size: int, warmup: float) -> list[str]:
    return [str(binary), "crr", host, str(port), f"{seconds:g}", str(concurrency), str(size), f"{warmup:g}"]


def hold_argv(binary: Path, host: str, port: int, count: int) -> list[str]:
    return [str(binary), "hold", host, str(port), str(count)]


def connect_argv(binary: Path, host: str, port: int, count: int, after: str, max_seconds: float) -> list[str]:
    return [str(binary), "connect", host, str(port), str(count), after, f"{max_seconds:g}"]


def connect2_argv(binary: Path, a: tuple[str, int, str, str], b: tuple[str, int, str, str], count: int,
                  max_seconds: float) -> list[str]:
    """Alternate connects of variant a and b; each is (host, port, cgroup directory, "exchange" | "eof")."""
    words = [str(binary), "connect2"]
    for host, port, cgroup, after in (a, b):
        words += [host, str(port), f"{cgroup.rstrip('/')}/cgroup.procs", after]
    return words + [str(count), f"{max_seconds:g}"]


def iperf3_server_argv(port: int = BULK_PORT) -> list[str]:
    return ["iperf3", "-s", "-1", "-p", str(port)]


def iperf3_seconds(seconds: float) -> int:
    """iperf3 takes whole seconds, and reads -t 0 as "forever": at least 1."""
    return max(1, math.ceil(seconds))


def iperf3_client_argv(host: str, port: int, seconds: float, streams: int) -> list[str]:
    return ["iperf3", "-c", host, "-p", str(port), "-t", str(iperf3_seconds(seconds)), "-P", str(streams),
            "-l", IPERF3_BLOCK, "-J"]


def sockperf_server_argv(port: int = SOCKPERF_PORT) -> list[str]:
    return ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(port)]


def sockperf_client_argv(host: str, port: int, seconds: float, size: int) -> list[str]:
    return ["sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port), "-t", f"{max(1, round(seconds))}",
            "-m", str(size), "--full-rtt"]


def parse_json_line(text: str, what: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} printed no JSON result: {text[-500:]!r}")


def parse_iperf3(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RuntimeError(f"iperf3 printed no JSON ({exc}): {text[-500:]!r}") from exc
    if doc.get("error"):
        raise RuntimeError(f"iperf3: {doc['error']}")
    received = doc["end"]["sum_received"]
    return {"bytes": received["bytes"], "seconds": received["seconds"], "gbps": received["bits_per_second"] / 1e9,
            "retransmits": doc["end"].get("sum_sent", {}).get("retransmits")}


_SOCKPERF_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")


def parse_sockperf(text: str) -> dict:
    """The full round-trip percentiles (µs) of ``sockperf ping-pong --full-rtt``."""
    found = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    if 50.0 not in found:
        raise RuntimeError(f"sockperf printed no percentiles: {text[-500:]!r}")
    return {"p50": found[50.0], "p99": found.get(99.0)}
