"""Not collected by itself (no test_ prefix): the run that tests/e2e/test_interrupted_run.py starts and
interrupts. One test on a real lab (agents, issuer, a server in a pod) that writes what it started to
the file ``TCPMESH_INTERRUPT_READY`` names, then blocks on that server as a stuck test would."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from agent.lab import lab as labops
from tests.e2e.conftest import Lab

READY_ENV = "TCPMESH_INTERRUPT_READY"


@pytest.fixture(scope="module")
def lab(bpf_capable):
    name = f"int{uuid.uuid4().hex[:6]}"
    made = None
    try:
        made = Lab(name, labops.lab_up(name, 2, 1, "int.tcpmesh"))
        yield made
    finally:
        if made is not None:
            made.stop_apps()
        labops.lab_down(name)


def test_blocks_on_a_pod_server(lab):
    server = lab.start_server("n2p1", 7500, "echo")
    with open(os.environ[READY_ENV] + ".tmp", "w") as f:
        json.dump({"lab": lab.name, "app_pid": server.pid, "pytest_pid": os.getpid()}, f)
    os.replace(os.environ[READY_ENV] + ".tmp", os.environ[READY_ENV])
    server.wait()   # no timeout: only an interrupt ends this test
