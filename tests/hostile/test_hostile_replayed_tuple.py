"""Attack: pass STRICT by replaying the inbound proxy's old 4-tuple (issue #15 item 2).

A STRICT workload lets a SYN in only when its 4-tuple is in ``tcpmesh_proxy_conns`` — the record
sockops makes when the inbound proxy connects to a pod (from the pods' gateway address on the node,
169.254.1.1 in the lab). That
record used to stay after the connection closed (LRU eviction only), so a process on the node,
outside the agent's cgroup, that reused the closed connection's source address and port got its
plaintext SYN past STRICT (a node process can bind any port of the node's own address). Fixed in 843dae4 (the record is deleted at the proxy socket's TCP_CLOSE);
this is the attacker's test of it: a meshed connection into a STRICT pod, closed with a reset (no
TIME_WAIT anywhere), then the same 4-tuple from a process in the node's namespace — it
must be dropped and counted in ``tcpmesh_plaintext_rejected_total``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.lab import lab as labops
from tests.e2e.conftest import Lab
from tests.hostile.conftest import running_lab

PORT = 7441
RELOAD = 15.0

# In the STRICT pod: accept, echo one line, report the peer it came from, then reset (no TIME_WAIT).
SERVER = r"""
import json, socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.settimeout(5)
    try:
        data = c.recv(100)
        print(json.dumps({"peer": peer, "data": data.decode(errors="replace")}), flush=True)
        if data:
            c.sendall(data)
            c.recv(100)  # the client's FIN (or nothing)
    except OSError:
        pass
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""

# In the client pod: one meshed exchange.
CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"hello\n"); print(s.recv(100).decode().strip())
"""

# In the node's namespace, outside the agent's cgroup: the same 4-tuple, plaintext.
REPLAY = r"""
import socket, sys
IP_TRANSPARENT = 19
s = socket.socket()
s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[5]))
try:
    s.connect((sys.argv[3], int(sys.argv[4]))); print("connected")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.fixture(scope="module")
def strict_lab(bpf_capable):
    with running_lab("rt", "rt.tcpmesh") as lab:
        yield lab


def rejected(lab: Lab) -> float:
    total = 0.0
    for line in lab.admin_get(2, "/metrics").decode().splitlines():
        if line.startswith("tcpmesh_plaintext_rejected_total{") and 'workload="n2p1"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def replay(lab: Lab, source: tuple[str, int], timeout: float) -> str:
    target = lab.pod("n2p1").ip
    proc = labops.lab_exec(lab.name, "node2", [sys.executable, "-c", REPLAY, source[0], str(source[1]), target,
                                               str(PORT), str(timeout)], stdout=subprocess.PIPE, text=True)
    return proc.communicate(timeout=timeout + 30)[0].strip()


def test_a_closed_connections_4_tuple_replayed_from_the_node_does_not_pass_strict(strict_lab):
    lab = strict_lab
    Path(f"{lab.plan.state_dir}/policies/n2p1-strict.yaml").write_text(textwrap.dedent("""\
        kind: PeerAuthentication
        metadata: {name: n2p1-strict, namespace: lab}
        spec:
          selector: {workload: n2p1}
          mtls: {mode: STRICT}
        """))
    server = labops.lab_exec(lab.name, "n2p1", [sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE,
                             text=True)
    lab.apps.append(server)
    assert server.stdout.readline().strip() == "listening"
    peers: list = []
    threading.Thread(target=lambda: [peers.append(json.loads(line)) for line in server.stdout], daemon=True).start()
    # STRICT in force: a plaintext connect from the node (a fresh port) is dropped
    deadline = time.monotonic() + RELOAD
    while replay(lab, (lab.node(2).wire_address, 0), 1.0) != "TimeoutError":
        assert time.monotonic() < deadline, "STRICT never came into force for n2p1"
    client = labops.lab_exec(lab.name, "n1p1", [sys.executable, "-c", CLIENT, lab.pod("n2p1").ip, str(PORT)],
                             stdout=subprocess.PIPE, text=True)
    assert client.communicate(timeout=30)[0].strip() == "hello", "the meshed connection did not work"
    deadline = time.monotonic() + 5
    while not any(p["data"] == "hello\n" for p in peers):
        assert time.monotonic() < deadline, peers
        time.sleep(0.05)
    peer = next(p["peer"] for p in peers if p["data"] == "hello\n")  # the inbound proxy's leg into the pod
    time.sleep(1.0)  # the reset has closed the inbound proxy's socket
    before = rejected(lab)
    outcome = replay(lab, (peer[0], peer[1]), 3.0)
    # before the fix (843dae4^): "connected" is not needed to lose — the SYN was let in as the proxy's
    assert outcome == "TimeoutError", f"the replayed 4-tuple {peer} -> n2p1:{PORT} got {outcome}"
    deadline = time.monotonic() + 5
    while rejected(lab) < before + 1:
        assert time.monotonic() < deadline, "the replayed SYN was not counted as plaintext rejected"
        time.sleep(0.2)
