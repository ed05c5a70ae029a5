"""The e2e tier: one lab (2 nodes x 2 pods, one real agent per node, real capture) shared by the
tests of a module, torn down afterwards even when a test fails. ``mesh_lab`` runs each module once
per capture mode (ebpf-connect, ebpf-tc, iptables); ``lab.capture_mode`` says which. Every module's lab
fixture comes from ``module_lab`` (the one factory); at session start ``reap_dead_labs`` removes the labs
of runs that were killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any, Sequence

import pytest

from agent.lab import files as lab_files
from agent.lab import lab as labops
from agent.lab.nsenter import http_get_in_netns


CAPTURE_MODES = ("ebpf-connect", "ebpf-tc", "iptables")


@pytest.fixture(scope="session", autouse=True)
def reap_dead_labs(request):
    """At session start, take down the labs of runs that were killed (their recorded owner is gone), and
    say which and why; labs of live runs (other sessions on this machine) are left alone."""
    if os.geteuid() != 0:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for reaped in labops.reap_orphaned_labs():
        outcome = f"could not: {reaped['error']}" if "error" in reaped else "removed"
        line = f"tcpmesh: reaped lab {reaped['name']!r} ({reaped['reason']}): {outcome}"
        if reporter is not None:
            reporter.write_line(line, yellow=True)


def module_lab(name: str, prefix: str, nodes: int, pods_per_node: int, trust_domain: str, *,
               capture_modes: Sequence[str] | None = None, servers: Sequence[tuple[str, int, str]] = (),
               **lab_up_kwargs: Any):
    """A module-scoped fixture called ``name``: one lab ``<prefix><6 hex>`` (``labops.lab_up`` with these
    arguments) as a ``Lab``, with ``servers`` — (pod, port, mode) sample servers — started on it; its apps
    stopped and the lab taken down afterwards, also when a test or the setup fails or the run is
    interrupted. With ``capture_modes`` the module runs once per mode (``lab.capture_mode`` says which)."""

    @pytest.fixture(scope="module", name=name, params=capture_modes)
    def fixture(request, bpf_capable):
        capture_mode = (request.param if capture_modes
                        else lab_up_kwargs.get("capture_mode", lab_files.DEFAULT_CAPTURE_MODE))
        lab_name = f"{prefix}{uuid.uuid4().hex[:6]}"
        lab = None
        try:
            lab = Lab(lab_name, labops.lab_up(lab_name, nodes, pods_per_node, trust_domain,
                                              **{**lab_up_kwargs, "capture_mode": capture_mode}), capture_mode)
            for pod, port, mode in servers:
                lab.start_server(pod, port, mode)
            yield lab
        finally:
            if lab is not None:
                lab.stop_apps()
            labops.lab_down(lab_name)  # also removes the logs a failed lab_up keeps

    return fixture


mesh_lab = module_lab("mesh_lab", "e2e", 2, 2, "e2e.tcpmesh", capture_modes=CAPTURE_MODES)


class Lab:
    def __init__(self, name, plan, capture_mode: str = "ebpf-connect") -> None:
        self.name = name
        self.plan = plan
        self.capture_mode = capture_mode
        self.apps: list[subprocess.Popen] = []

    def pod(self, name):
        return self.plan.pod(name)

    def node(self, index: int):
        return self.plan.nodes[index - 1]

    def start_server(self, pod: str, port: int, mode: str) -> subprocess.Popen:
        proc = labops.lab_exec(self.name, pod, [sys.executable, "-m", "agent.demo.sampleapps", "server", "--port", str(port),
                                                "--mode", mode], stdout=subprocess.PIPE, text=True)
        self.apps.append(proc)
        assert "listening" in proc.stdout.readline()
        return proc

    def run_client(self, pod: str, address: str, size: int, mode: str, marker: str = "",
                   name: str = "e2e-client") -> dict:
        proc = labops.lab_exec(self.name, pod, [sys.executable, "-m", "agent.demo.sampleapps", "client", "--connect",
                                                address, "--bytes", str(size), "--mode", mode, "--marker", marker,
                                                "--name", name], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
        result["started_pid"] = proc.pid
        return result

    def admin_get(self, node_index: int, path: str) -> bytes:
        node = self.node(node_index)
        status, body = http_get_in_netns(node.netns, f"http://{node.admin_address}{path}")
        assert status == 200, f"{node.name} {path}: HTTP {status}"
        return body

    def metrics_text(self, node_index: int) -> str:
        return self.admin_get(node_index, "/metrics").decode()

    def flows(self, node_index: int) -> list[dict]:
        return json.loads(self.admin_get(node_index, "/debug/flows"))["flows"]

    def wait_flow(self, node_index: int, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for flow in self.flows(node_index):
                if flow["end_time"] is not None and predicate(flow):
                    return flow
            time.sleep(0.1)
        raise AssertionError(f"no matching closed flow on node{node_index}: {self.flows(node_index)}")

    def stop_apps(self) -> None:
        for proc in self.apps:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
