"""Real servers in lab pods and their own load tools as clients, for tests/e2e/test_real_workloads.py
and test_services.py, and the lab they share (``real_workloads_lab``).

PostgreSQL 15 and Redis are the Debian packages (deploy/bootstrap-debian.sh installs them); the
servers and the parsers of pgbench's and redis-benchmark's output are agent/lab/realservers.py's,
shared with the benchmark. Here servers run inside a pod (its netns and cgroup) listening on the pod
IP. Clients run either in a pod (captured: through the mesh) or in a pod's netns but outside its
cgroup (not captured: the same path without the mesh, for the baseline).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Mapping

import yaml

from agent.lab import lab as labops
from agent.lab import realservers
from agent.lab.realservers import (PG_BIN, PG_PORT, REDIS_PORT, geometric_mean, missing_tools,  # noqa: F401
                                 parse_pgbench, parse_redis_benchmark)
from agent.lab.nsenter import popen_in
from tests.conftest import skip_or_fail
from tests.e2e.conftest import Lab
from tests.e2e.reliability_lab import set_sysctls

Launcher = realservers.Launcher

# The baselines dial the same server and port from the client pod's address outside the mesh, while the
# server's node still holds the mesh's inbound legs for (client pod address, port) -> server, TIME_WAIT ones
# included, for 60 s (docs/capture-source-address.md, "A limit: the same 4-tuple outside the mesh"). Were
# a baseline connection to pick a port the server's node used for a leg, that node's early demux attaches
# the TIME_WAIT socket to the server's SYN-ACK and the baseline connection hangs (seen in CI: redis-cli's
# direct GET "still running after 30s"). Pods and nodes pick ephemeral ports from disjoint ranges, as in
# the benchmark's world (bench/world.py), so the two kinds of tuple never meet.
POD_PORT_RANGE = {"net.ipv4.ip_local_port_range": "10000 49999"}
NODE_PORT_RANGE = {"net.ipv4.ip_local_port_range": "50000 65535"}


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
        for node in lab.plan.nodes:
            set_sysctls(node.netns, NODE_PORT_RANGE)
            for pod in node.pods:
                set_sysctls(pod.netns, POD_PORT_RANGE)
        os.makedirs(f"{lab.plan.state_dir}/policies", exist_ok=True)
        yield lab, servers
    finally:
        if lab is not None:
            lab.stop_apps()
        for server in servers:
            server.stop()
        labops.lab_down(name)


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
# The servers and parsers live in agent/lab/realservers.py (the benchmark uses them too); these bind
# them to a test's lab: the server runs in the pod (its netns and cgroup).

class Postgres(realservers.Postgres):
    """PostgreSQL 15 in a pod, listening on the pod's IPv4 and IPv6 addresses, trusting the lab's addresses.

    Through the mesh the server sees the client pod's own address (proxy.source_address, the default
    auto), or the pods' gateway 169.254.1.1 with proxy.source_address node; the baseline connects from
    the client pod's own IP. ``hba``: pg_hba.conf lines instead of the default (trust the pods' gateway
    and every lab pod).
    """

    def __init__(self, lab, pod: str, hba: tuple[str, ...] | None = None) -> None:
        super().__init__(in_pod(lab, pod), lab.pod(pod).ip, hba if hba is not None else default_hba(lab), where=pod,
                         ip6=lab.pod(pod).ip6)
        self.pod = lab.pod(pod)


class Redis(realservers.Redis):
    """Redis in a pod, listening on the pod's IPv4 and IPv6 addresses, no persistence."""

    def __init__(self, lab, pod: str) -> None:
        super().__init__(in_pod(lab, pod), lab.pod(pod).ip, where=pod, ip6=lab.pod(pod).ip6)
        self.pod = lab.pod(pod)


def default_hba(lab) -> tuple[str, ...]:
    return (f"host all all {lab.plan.pod_gateway}/32 trust", "host all all 10.77.0.0/16 trust")


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
