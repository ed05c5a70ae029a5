"""Not collected by itself (no test_ prefix): the run that tests/e2e/test_interrupted_run.py starts and
interrupts. One test on a real lab (agents, issuer, a server in a pod) that writes what it started to
the file ``TCPMESH_INTERRUPT_READY`` names, then blocks on that server as a stuck test would."""

from __future__ import annotations

import json
import os

from tests.e2e.conftest import module_lab

READY_ENV = "TCPMESH_INTERRUPT_READY"


lab = module_lab("lab", "int", 2, 1, "int.tcpmesh")


def test_blocks_on_a_pod_server(lab):
    server = lab.start_server("n2p1", 7500, "echo")
    with open(os.environ[READY_ENV] + ".tmp", "w") as f:
        json.dump({"lab": lab.name, "app_pid": server.pid, "pytest_pid": os.getpid()}, f)
    os.replace(os.environ[READY_ENV] + ".tmp", os.environ[READY_ENV])
    server.wait()   # no timeout: only an interrupt ends this test
