"""What the reliability and security lab tests share: a 2-node lab whose agents get extra settings
through TCPMESH_* environment variables (agent/config/environment.py applies them over the lab's config files),
the workloads of reliability_apps.py, and readings of the agents: open fds, RSS, runtime metrics,
counters, and entry counts of their pinned BPF maps.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from agent.lab import lab as labops
from agent.lab.files import DEFAULT_CAPTURE_MODE
from agent.lab.nsenter import http_get_in_netns

APPS = str(Path(__file__).with_name("reliability_apps.py"))
ECHO_PORT, DIGEST_PORT = 7400, 7401
# Tens of thousands of short connections from one pod to one server: reuse TIME_WAIT ports.
SYSCTLS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"}
HASH_MAP_TYPES = {1: "hash", 5: "percpu_hash", 9: "lru_hash", 10: "lru_percpu_hash", 11: "lpm_trie"}


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the agents this process starts (lab up, restarts); restore after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RelLab:
    def __init__(self, name: str, plan, env: Mapping[str, str]) -> None:
        self.name, self.plan, self.env = name, plan, dict(env)
        self.capture_mode = DEFAULT_CAPTURE_MODE  # what lab_up (below) starts the agents with
        self.apps: list[subprocess.Popen] = []

    # -- workloads ---------------------------------------------------------------------------------
    def start_server(self, pod: str = "n2p1") -> subprocess.Popen:
        proc = labops.lab_exec(self.name, pod, [sys.executable, APPS, "server", "--port", str(ECHO_PORT),
                                                "--digest-port", str(DIGEST_PORT)], stdout=subprocess.PIPE, text=True)
        self.apps.append(proc)
        assert "listening" in proc.stdout.readline()
        return proc

    def client(self, role: str, *args: str, pod: str = "n1p1", target: str = "n2p1", port: int = ECHO_PORT) \
            -> subprocess.Popen:
        argv = [sys.executable, APPS, role, "--connect", f"{self.plan.pod(target).ip}:{port}", *args]
        proc = labops.lab_exec(self.name, pod, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.apps.append(proc)
        return proc

    def run(self, role: str, *args: str, timeout: float = 300, **kwargs) -> dict:
        proc = self.client(role, *args, **kwargs)
        out, _ = proc.communicate("", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def stop_apps(self) -> None:
        for proc in self.apps:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.apps.clear()

    # -- agents ------------------------------------------------------------------------------------
    def pod(self, name: str):
        return self.plan.pod(name)

    def node(self, index: int):
        return self.plan.nodes[index - 1]

    def agent_pid(self, index: int) -> int:
        return json.loads(Path(self.plan.state_file).read_text())["agents"][f"node{index}"]["pid"]

    def restart_agent(self, index: int) -> None:
        with environment(self.env):
            labops.lab_restart_agent(self.name, f"node{index}")

    def fds(self, index: int) -> int:
        return len(os.listdir(f"/proc/{self.agent_pid(index)}/fd"))

    def rss_kib(self, index: int) -> int:
        status = Path(f"/proc/{self.agent_pid(index)}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    def get(self, index: int, path: str) -> str:
        node = self.node(index)
        status, body = http_get_in_netns(node.netns, f"http://{node.admin_address}{path}")
        assert status == 200, f"node{index} {path}: HTTP {status}"
        return body.decode()

    def metrics(self, index: int) -> dict[str, float]:
        """Every sample of /metrics, keyed by its text before the value (name{labels})."""
        samples = {}
        for line in self.get(index, "/metrics").splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def metrics_text(self, index: int) -> str:
        return self.get(index, "/metrics")

    def metric_sum(self, index: int, name: str, **labels: str) -> float:
        total = 0.0
        for key, value in self.metrics(index).items():
            if key == name or key.startswith(name + "{"):
                if all(f'{k}="{v}"' in key for k, v in labels.items()):
                    total += value
        return total

    def flows(self, index: int) -> list[dict]:
        return json.loads(self.get(index, "/debug/flows"))["flows"]

    def wait_flow(self, index: int, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for flow in self.flows(index):
                if flow["end_time"] is not None and predicate(flow):
                    return flow
            time.sleep(0.1)
        raise AssertionError(f"no matching closed flow on node{index}: "
                             f"{[(f['response_flags'], f['detail']) for f in self.flows(index)][-10:]}")

    def log(self, index: int) -> str:
        return Path(self.node(index).log_file).read_text(errors="replace")

    def map_counts(self, index: int) -> dict[str, dict]:
        """Entries in each pinned hash-like map of the node (arrays have fixed size and are skipped)."""
        from agent.bpf.libbpf import Libbpf

        libbpf, counts = Libbpf(), {}
        for directory in Path(self.node(index).bpffs_dir).rglob("*"):
            if not directory.is_dir() or "maps" not in directory.name:
                continue
            for pin in directory.iterdir():
                fd = libbpf.obj_get(str(pin))
                try:
                    info = libbpf.map_info(fd, str(pin))
                    if info.map_type in HASH_MAP_TYPES:
                        entries = len(libbpf.map_keys(fd, info.key_size, str(pin)))
                        counts[pin.name] = {"type": HASH_MAP_TYPES[info.map_type], "entries": entries,
                                            "max_entries": info.max_entries}
                finally:
                    os.close(fd)
        return counts


def figures(test: str, **values) -> None:
    """Print a test's measured figures; TCPMESH_RELIABILITY_FIGURES=<file> also appends them there as
    JSON lines (how docs/reliability.md was filled in)."""
    print(json.dumps({"test": test, **values}))
    path = os.environ.get("TCPMESH_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "time": time.time(), **values}) + "\n")


def set_sysctls(netns: str, values: Mapping[str, str] = SYSCTLS) -> None:
    for key, value in values.items():
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"], check=True)


@contextlib.contextmanager
def reliability_lab(prefix: str, pods_per_node: int = 1, env: Mapping[str, str] | None = None,
                    identity: str = labops.DEFAULT_IDENTITY) -> Iterator[RelLab]:
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        with environment(env or {}):
            plan = labops.lab_up(name, 2, pods_per_node, f"{prefix}.tcpmesh", identity=identity)
        lab = RelLab(name, plan, env or {})
        for netns in [p.netns for p in plan.pods] + [n.netns for n in plan.nodes]:
            set_sysctls(netns)
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def wait_until(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)
