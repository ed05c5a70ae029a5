"""Real servers in lab pods and their own load tools as clients, for tests/e2e/test_real_workloads.py
and test_services.py, and the lab they share (``real_workloads_lab``).

PostgreSQL 15 and Redis are the Debian packages (deploy/bootstrap-debian.sh installs them). Servers
run inside a pod (its netns and cgroup) listening on the pod IP; each gets a fresh temp dir that is
removed when it stops. Clients run either in a pod (captured: through the mesh) or in a pod's netns
but outside its cgroup (not captured: the same path without the mesh, for the baseline). Parsers turn
what pgbench and redis-benchmark print into numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import yaml

from agent.lab import lab as labops
from agent.lab.nsenter import popen_in
from tests.conftest import skip_or_fail
from tests.e2e.conftest import Lab

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_PORT = 5432
REDIS_PORT = 6379
START_TIMEOUT = 30.0

Launcher = Callable[..., subprocess.Popen]


@contextlib.contextmanager
def real_workloads_lab(prefix: str, pods_per_node: int, trust_domain: str,
                       accounts: Mapping[str, str]) -> Iterator[tuple[Lab, list]]:
    """A 2-node lab in ebpf-connect mode (the baselines rely on a process outside a pod cgroup not being
    captured) with a policy directory, for real servers; yields the lab and a list the caller appends
    its servers to. Afterwards — also after a failure — the lab's apps stop, then the servers, then the
    lab goes. Skips (or, under CI, fails) when PostgreSQL, Redis or their tools are missing."""
    problem = missing_tools()
    if problem:
        skip_or_fail(problem)
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    lab, servers = None, []
    try:
        lab = Lab(name, labops.lab_up(name, 2, pods_per_node, trust_domain, service_accounts=dict(accounts),
                                      capture_mode="ebpf-connect"))
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        yield lab, servers
    finally:
        if lab is not None:
            lab.stop_apps()
        for server in servers:
            server.stop()
        labops.lab_down(name)


def missing_tools() -> str | None:
    """Why the real workloads cannot run here, or None."""
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


def in_pod(lab, pod: str) -> Launcher:
    """Start commands in the pod's netns and cgroup: their outbound TCP goes through the mesh."""
    return lambda argv, **kw: labops.lab_exec(lab.name, pod, argv, **kw)


def beside_pod(lab, pod: str) -> Launcher:
    """Start commands in the pod's netns but outside its cgroup: the same route, without the mesh."""
    return lambda argv, **kw: popen_in(argv, netns=lab.pod(pod).netns, **kw)


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr together
    seconds: float


def run(launch: Launcher, argv: list[str], timeout: float) -> Run:
    """Run to completion; a run that outlives ``timeout`` is killed and fails the test (a hang)."""
    started = time.monotonic()
    proc = launch(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(argv)} still running after {timeout:.0f}s (a hang); output: {out[-2000:]}")
    return Run(tuple(argv), proc.returncode, out, time.monotonic() - started)


# ------------------------------------------------------------------------------------------ servers

class _Server:
    ready_line = ""

    def __init__(self, lab, pod: str) -> None:
        self.lab = lab
        self.pod = lab.pod(pod)
        self.dir = tempfile.mkdtemp(prefix=f"tcpmesh-{type(self).__name__.lower()}-")
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc: subprocess.Popen | None = None

    def _launch(self, argv: list[str]) -> None:
        with open(self.log_path, "w") as log:
            self.proc = labops.lab_exec(self.lab.name, self.pod.name, argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while self.ready_line not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} in {self.pod.name} did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (and wait for it, so the pod cgroup empties), then remove its directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Postgres(_Server):
    """PostgreSQL 15 in a pod, listening on the pod IP, trusting the lab's addresses.

    Through the mesh the server sees the client pod's own address (proxy.source_address, the default
    auto), or the pods' gateway 169.254.1.1 with proxy.source_address node; the baseline connects from
    the client pod's own IP.
    fsync is off: the benchmark is about the network path, not the disk.
    """

    ready_line = "database system is ready to accept connections"

    def __init__(self, lab, pod: str, hba: tuple[str, ...] | None = None) -> None:
        super().__init__(lab, pod)
        # pg_hba.conf lines appended after initdb's; default: trust the pods' gateway and every lab pod
        self.hba = hba if hba is not None else (f"host all all {lab.plan.pod_gateway}/32 trust",
                                                 "host all all 10.77.0.0/16 trust")

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
                                    "-c", f"listen_addresses={self.pod.ip}", "-c", f"unix_socket_directories={self.dir}",
                                    "-c", "fsync=off", "-c", "max_connections=64"])
        return self

    def stop(self, sig: int = signal.SIGINT) -> None:  # SIGINT: PostgreSQL's "fast" shutdown
        super().stop(sig)


class Redis(_Server):
    """Redis in a pod, listening on the pod IP, no persistence."""

    ready_line = "Ready to accept connections"

    def start(self) -> "Redis":
        self._launch(["redis-server", "--bind", self.pod.ip, "--port", str(REDIS_PORT), "--protected-mode", "no",
                      "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"])
        return self


# ------------------------------------------------------------------------------------------ parsers

@dataclass(frozen=True)
class PgbenchResult:
    processed: int
    failed: int
    tps: float


def parse_pgbench(output: str) -> PgbenchResult:
    """The summary pgbench 15 prints at the end of a run."""
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    tps = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", output, re.M)
    if not (processed and failed and tps):
        raise AssertionError(f"no pgbench summary in: {output[-2000:]}")
    return PgbenchResult(int(processed.group(1)), int(failed.group(1)), float(tps.group(1)))


_REDIS_RATE = re.compile(r"^\s*([A-Z][A-Z_0-9]*(?: \([^)]*\))?): ([\d.]+) requests per second")
_REDIS_ERROR = re.compile(r"error|err |could not|reset by peer|refused|closed the connection", re.I)


def parse_redis_benchmark(output: str) -> tuple[dict[str, float], list[str]]:
    """({test: requests per second}, error lines). redis-benchmark redraws progress with CR."""
    rates: dict[str, float] = {}
    errors: list[str] = []
    for line in re.split(r"[\r\n]+", output):
        if match := _REDIS_RATE.match(line):
            rates[match.group(1)] = float(match.group(2))
        elif _REDIS_ERROR.search(line):
            errors.append(line.strip())
    return rates, errors


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------------------- access log

def access_records(node) -> list[dict]:
    """The JSON access records a node's agent wrote: to its log (stdout) or to access_log.path."""
    paths = [node.log_file]
    with open(node.config_file) as f:
        configured = ((yaml.safe_load(f) or {}).get("access_log") or {}).get("path", "-")
    if configured not in ("-", "off") and configured.startswith("/"):
        paths.append(configured)
    records = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "flow_id" in record:
                    records.append(record)
    return records
