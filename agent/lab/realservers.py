"""Real PostgreSQL and Redis servers in lab pods, and parsers for their load tools' output.

Used by the real-workload tests (tests/e2e/real_workloads.py) and the benchmark's database scenario
(bench/databases.py). PostgreSQL 15 and Redis are the Debian packages (deploy/bootstrap-debian.sh
installs them). A server listens on its pod's IP (and its IPv6 address, ``ip6``); how and where its process starts (the pod's netns
and cgroup, or the pod's netns and another cgroup) is the caller's ``launch``, a callable like
``subprocess.Popen(argv, **kwargs)`` that returns a Popen. Each server gets a fresh temporary
directory that is removed when it stops. The parsers are pure.

Imports nothing of the lab's network code: the caller owns namespaces and cgroups.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_PORT = 5432
REDIS_PORT = 6379
START_TIMEOUT = 30.0

Launcher = Callable[..., subprocess.Popen]


def missing_tools() -> str | None:
    """Why the real servers and their load tools cannot run here (with the fix), or None."""
    for tool in ("initdb", "postgres", "pgbench", "psql"):
        if not os.access(f"{PG_BIN}/{tool}", os.X_OK):
            return f"{PG_BIN}/{tool} is missing: install postgresql-15 (deploy/bootstrap-debian.sh does)"
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: install redis-server and redis-tools (deploy/bootstrap-debian.sh does)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no 'postgres' user (the postgresql-15 package creates it)"
    return None


class Server:
    """A server process started by ``launch``, ready once ``ready_line`` is in its log."""

    ready_line = ""
    stop_signal = signal.SIGTERM

    def __init__(self, launch: Launcher, ip: str, where: str = "", ip6: str | None = None) -> None:
        self.launch = launch
        self.ip = ip
        self.addresses = (ip, ip6) if ip6 else (ip,)  # where it listens: a dual-stack pod's both
        self.where = where or ip  # for messages: the pod's name
        self.dir = tempfile.mkdtemp(prefix=f"tcpmesh-{type(self).__name__.lower()}-")
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc: subprocess.Popen | None = None

    def _launch(self, argv: list[str]) -> None:
        with open(self.log_path, "w") as log:
            self.proc = self.launch(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while self.ready_line not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} in {self.where} did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int | None = None) -> None:
        """Stop the server (and wait for it, so its cgroup empties), then remove its directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(self.stop_signal if sig is None else sig)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Postgres(Server):
    """PostgreSQL 15 listening on ``ip`` (and ``ip6``), trusting the addresses of ``hba`` (pg_hba.conf lines appended
    after initdb's). fsync is off: what is measured is the network path, not the disk."""

    ready_line = "database system is ready to accept connections"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown

    def __init__(self, launch: Launcher, ip: str, hba: Sequence[str], where: str = "",
                 max_connections: int = 64, ip6: str | None = None) -> None:
        super().__init__(launch, ip, where, ip6)
        self.hba = tuple(hba)
        self.max_connections = max_connections

    def start(self) -> "Postgres":
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        data = os.path.join(self.dir, "data")
        subprocess.run(as_postgres + [f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
                                      "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, timeout=60)
        with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
            hba.write("".join(f"{line}\n" for line in self.hba))
        self._launch(as_postgres + [f"{PG_BIN}/postgres", "-D", data, "-p", str(PG_PORT),
                                    "-c", f"listen_addresses={','.join(self.addresses)}",
                                    "-c", f"unix_socket_directories={self.dir}",
                                    "-c", "fsync=off", "-c", f"max_connections={self.max_connections}"])
        return self


class Redis(Server):
    """Redis listening on ``ip`` (and ``ip6``), no persistence."""

    ready_line = "Ready to accept connections"

    def start(self) -> "Redis":
        self._launch(["redis-server", "--bind", *self.addresses, "--port", str(REDIS_PORT), "--protected-mode", "no",
                      "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"])
        return self


# ------------------------------------------------------------------------------------------ parsers

@dataclass(frozen=True)
class PgbenchResult:
    processed: int
    failed: int
    tps: float
    latency_ms: float | None = None  # average transaction latency, as pgbench prints it


def parse_pgbench(output: str) -> PgbenchResult:
    """The summary pgbench 15 prints at the end of a run; ValueError without one."""
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", output, re.M)
    latency = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    if not (processed and failed and tps):
        raise ValueError(f"no pgbench summary in: {output[-2000:]}")
    return PgbenchResult(int(processed.group(1)), int(failed.group(1)), float(tps.group(1)),
                         float(latency.group(1)) if latency else None)


_REDIS_RATE = re.compile(r"^\s*([A-Z][A-Z_0-9]*(?: \([^)]*\))?): ([\d.]+) requests per second")
_REDIS_ERROR = re.compile(r"error|err |could not|reset by peer|refused|closed the connection", re.I)


def parse_redis_benchmark(output: str) -> tuple[dict[str, float], list[str]]:
    """({test: requests per second}, error lines) from ``redis-benchmark -q``, which redraws progress with CR."""
    rates: dict[str, float] = {}
    errors: list[str] = []
    for line in re.split(r"[\r\n]+", output):
        if match := _REDIS_RATE.match(line):
            rates[match.group(1)] = float(match.group(2))
        elif _REDIS_ERROR.search(line):
            errors.append(line.strip())
    return rates, errors


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
