"""The hostile tier: each test plays an attacker against a real lab (namespaces as nodes and pods, real
agents, real capture) and asserts that a promise of docs/security.md holds. Every test here was seen
failing against the code before its fix (the commit that added it says so).

Helpers shared by the attacks: a plaintext connect from any network namespace and cgroup, and the
admin endpoint read without asserting on its status (an attack often wants to see a 503)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import uuid

from agent.lab import lab as labops
from agent.lab.nsenter import connect_in_netns, http_get_in_netns, popen_in
from tests.e2e.conftest import Lab

PLAIN_CONNECT = r"""
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b"plaintext?"); print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def plaintext_connect(netns: str, address: tuple[str, int], cgroup: str | None = None,
                      timeout: float = 1.0) -> str:
    """A plaintext TCP connect from ``netns`` (and, if given, from a process in ``cgroup``):
    'connected' or the name of the error ('TimeoutError' when the SYN went unanswered)."""
    if cgroup is None:
        try:
            connect_in_netns(netns, address, timeout=timeout).close()
            return "connected"
        except OSError as exc:
            return "TimeoutError" if isinstance(exc, socket.timeout) else type(exc).__name__
    proc = popen_in([sys.executable, "-c", PLAIN_CONNECT, address[0], str(address[1]), str(timeout)],
                    netns=netns, cgroup=cgroup, stdout=subprocess.PIPE, text=True)
    out = proc.communicate(timeout=timeout + 15)[0].strip()
    return {"timeout": "TimeoutError"}.get(out, out)


def admin_get(node, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(HTTP status, body) of the node agent's admin endpoint, from inside the node's netns."""
    status, body = http_get_in_netns(node.netns, f"http://{node.admin_address}{path}", timeout=timeout)
    return status, body.decode(errors="replace")


@contextlib.contextmanager
def running_lab(prefix: str, trust_domain: str, nodes: int = 2, pods_per_node: int = 1):
    """A lab of its own for one attack module (a unique name from ``prefix``), torn down afterwards even
    when a test fails; the caller's fixture asks for ``bpf_capable`` first."""
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, nodes, pods_per_node, trust_domain))
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)
