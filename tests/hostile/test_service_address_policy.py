"""Attack: a pod dials the Service address of a workload that policy denies to it (issue #16 part 1).

The lab's Service ``secret`` (a virtual address, kube-proxy-like DNAT on every node, as in a
cluster) fronts a server in n2p1; a DENY policy forbids n1p2 to reach n2p1. Dialling n2p1's pod
address is denied — the destination node enforces policy on the mesh connection. Before Services
were meshed, dialling the *virtual address* instead was not in the mesh: the connect left the pod
in plaintext, the node's DNAT delivered it to n2p1, and the server answered — policy, mTLS and
identity all skipped. Now the virtual address is a mesh destination: the outbound proxy resolves it
to n2p1 and the destination node denies it exactly like the pod address. A permitted pod (n1p1)
reaches the same Service (the control).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from agent.lab import lab as labops
from agent.lab.services import lab_service_set, service_document
from tests.e2e.conftest import Lab

PORT = 7412
VIP = "10.96.0.30"
RELOAD = 15.0
SERVER = r"""
import socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=16)
print("listening", flush=True)
while True:
    conn, peer = listener.accept()
    conn.sendall(f"secret for {peer[0]}\n".encode())
    conn.close()
"""
CLIENT = r"""
import json, socket, sys
s = socket.socket(); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print(json.dumps({"got": s.recv(100).decode()}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}))
"""


@pytest.fixture(scope="module")
def svc_lab(bpf_capable):
    name = f"hs{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "hs.tcpmesh",
                                      service_accounts={"n1p1": "web", "n1p2": "intruder", "n2p1": "vault"}))
        server = labops.lab_exec(name, "n2p1", [sys.executable, "-c", SERVER, lab.pod("n2p1").ip, str(PORT)],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        lab.apps.append(server)
        assert "listening" in server.stdout.readline()
        lab_service_set(lab.plan, service_document(lab.plan, "secret", [VIP], [(PORT, PORT)], [("n2p1", True)]))
        policy = textwrap.dedent(f"""\
            kind: AuthorizationPolicy
            metadata: {{name: deny-intruder, namespace: {lab.plan.namespace}}}
            spec:
              action: DENY
              rules:
                - from: [{{principals: ["{lab.pod('n1p2').spiffe_id}"]}}]
            """)
        path = f"{lab.plan.state_dir}/policies/deny-intruder.yaml"
        with open(path + ".tmp", "w") as f:
            f.write(policy)
        os.replace(path + ".tmp", path)
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
            labops.lab_down(name)


def dial(lab: Lab, pod: str, address: str) -> dict:
    proc = labops.lab_exec(lab.name, pod, [sys.executable, "-c", CLIENT, address, str(PORT)],
                           stdout=subprocess.PIPE, text=True)
    return json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])


def eventually(check, message: str) -> None:
    deadline = time.monotonic() + RELOAD
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def test_the_service_address_of_a_denied_workload_is_denied_like_its_pod_address(svc_lab):
    lab = svc_lab
    started = time.time()  # a PONG alone proves nothing (the node's DNAT answers too): wait for node1's agent
    eventually(lambda: dial(lab, "n1p1", VIP).get("got", "").startswith("secret") and any(
        f["destination_service_name"] == "secret" for f in lab.flows(1) if f["start_time"] >= started),
        "control: the permitted pod never reached the Service through the mesh")
    eventually(lambda: not dial(lab, "n1p2", lab.pod("n2p1").ip).get("got"),
               "the DENY policy never applied to the pod address")
    since = time.time()
    attack = dial(lab, "n1p2", VIP)
    assert not attack.get("got"), f"the intruder read the secret through the Service address: {attack}"
    deadline = time.monotonic() + 10
    while True:
        denied = [f for f in lab.flows(2) if f["start_time"] >= since and f["response_flags"] == "DENY"
                  and f["destination_workload"] == "n2p1" and f["source_workload"] == "n1p2"]
        if denied or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert denied and denied[0]["policy"] == f"{lab.plan.namespace}/deny-intruder", lab.flows(2)[-3:]
    source = [f for f in lab.flows(1) if f["start_time"] >= since and f["source_workload"] == "n1p2"]
    assert source and source[-1]["destination_service_name"] == "secret", source
