"""Attack: reach a STRICT pod on another node without the mesh, by connecting in ways nobody's test used.

The capture is a cgroup connect hook (docs/capture-connect.md). An attacker in a pod (root in its netns
and cgroup, no host privileges) tries the other ways a TCP socket gets a destination, and other places to
run from, hoping one of them skips the hook, leaves in plaintext, or is attributed to an identity that is
not its own:

- TCP Fast Open: ``sendto(MSG_FASTOPEN)`` with data in the SYN (the attacker switches its netns's
  ``net.ipv4.tcp_fastopen`` to send data without a cookie), and ``TCP_FASTOPEN_CONNECT`` (connect()
  deferred to the first write);
- a non-blocking connect (EINPROGRESS, then poll);
- a dual-stack AF_INET6 socket dialling the pod's IPv4-mapped address (``::ffff:a.b.c.d``);
- a socket that connects, is disconnected with ``connect(AF_UNSPEC)`` and connects again;
- ``sendmsg`` with a destination on an unconnected TCP socket, without MSG_FASTOPEN;
- a container cgroup created below the pod cgroup *after* the agent registered and attached the pod
  (the kubelet's shape for a restarted or added container);
- a socket bound (IP_FREEBIND + IP_TRANSPARENT, so the SYN really leaves) to its node's address or to another pod's address, to be taken for the
  node or for that pod by the outbound proxy, which names the source by the client address.

The destination pod is STRICT, so a plaintext SYN is dropped in its kernel: an echo means the bytes went
through the mesh; the flow the destination's agent records must name the attacker's own identity. Each
attack is one row of docs/security.md's table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from agent.lab.nsenter import popen_in
from tests.hostile.conftest import running_lab

PORT = 7431
RELOAD = 2.0 + 3.0

ATTACK = r"""
import json, select, socket, sys
kind, ip, port, bind_ip = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dst = (ip, port)
msg = b"tcpmesh-redteam-" + kind.encode()
def echo(s):
    s.settimeout(4.0)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return "echoed" if got == msg else "no-echo:%r" % got
try:
    s = socket.socket()
    s.settimeout(4.0)
    if kind == "tfo_sendto":
        s.sendto(msg, socket.MSG_FASTOPEN, dst)
        out = echo(s)
    elif kind == "tfo_connect":
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)   # TCP_FASTOPEN_CONNECT
        s.connect(dst); s.sendall(msg); out = echo(s)
    elif kind == "nonblocking":
        s.setblocking(False)
        err = s.connect_ex(dst)
        select.select([], [s], [], 4.0)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, "connect")
        s.setblocking(True); s.sendall(msg); out = echo(s)
    elif kind == "v4_mapped":
        s = socket.socket(socket.AF_INET6); s.settimeout(4.0)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.connect(("::ffff:" + ip, port)); s.sendall(msg); out = echo(s)
    elif kind == "reconnect":
        import ctypes
        s.connect(dst); s.sendall(msg); first = echo(s)
        unspec = (ctypes.c_ubyte * 16)()   # struct sockaddr, sa_family AF_UNSPEC: disconnect
        if ctypes.CDLL(None, use_errno=True).connect(s.fileno(), unspec, 16) != 0:
            raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
        s.connect(dst); s.sendall(msg); out = first + "+" + echo(s)
        out = "echoed" if out == "echoed+echoed" else out
    elif kind == "sendmsg_unconnected":
        s.sendmsg([msg], [], 0, dst); out = echo(s)
    elif kind == "freebind":
        s.setsockopt(socket.IPPROTO_IP, 15, 1)    # IP_FREEBIND
        s.setsockopt(socket.IPPROTO_IP, 19, 1)    # IP_TRANSPARENT (root in its own netns may): the SYN leaves
        s.bind((bind_ip, 0)); s.connect(dst); s.sendall(msg); out = echo(s)
    else:
        s.connect(dst); s.sendall(msg); out = echo(s)
    local = s.getsockname()
except OSError as e:
    import errno
    out, local = type(e).__name__ + ("" if type(e) is not OSError else ":" + errno.errorcode.get(e.errno, str(e.errno))), None
print(json.dumps({"outcome": out, "local": local}))
"""


@pytest.fixture(scope="module")
def lab(bpf_capable):
    """2 nodes x 2 pods; an echo server in n2p1 (STRICT) and the attacker in n1p1."""
    with running_lab("hv", "hv.tcpmesh", nodes=2, pods_per_node=2) as lab:
        lab.start_server("n2p1", PORT, "echo")
        path = f"{lab.plan.state_dir}/policies/strict-n2p1.yaml"
        with open(path + ".tmp", "w") as f:
            f.write(textwrap.dedent("""\
                kind: PeerAuthentication
                metadata: {name: strict-n2p1, namespace: lab}
                spec:
                  selector: {workload: n2p1}
                  mtls: {mode: STRICT}
                """))
        os.replace(path + ".tmp", path)
        deadline = time.monotonic() + RELOAD
        while "STRICT" not in open(lab.node(2).log_file).read().split("workload lab/n2p1 inbound mode:")[-1][:12]:
            assert time.monotonic() < deadline, "the agent never set n2p1 STRICT"
            time.sleep(0.2)
        yield lab


def attack(lab, kind: str, cgroup: str | None = None, bind_ip: str = "") -> dict:
    pod = lab.pod("n1p1")
    proc = popen_in([sys.executable, "-c", ATTACK, kind, lab.pod("n2p1").ip, str(PORT), bind_ip],
                    netns=pod.netns, cgroup=cgroup or pod.exec_cgroup, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])


def assert_meshed_as_n1p1(lab, result: dict, what: str) -> None:
    assert result["outcome"] == "echoed", \
        f"{what}: {result}; node1's log ends: {open(lab.node(1).log_file).read()[-1500:]}"
    port = result["local"][1]
    flow = lab.wait_flow(2, lambda f: f.get("source_port") == port)
    assert flow["security"] == "mutual_tls" and flow["source_workload"] == "n1p1", f"{what}: {flow}"


@pytest.mark.parametrize("kind", ["tfo_sendto", "tfo_connect", "nonblocking", "v4_mapped", "reconnect"])
def test_each_way_of_connecting_to_a_strict_pod_is_meshed_as_the_pods_identity(lab, kind):
    netns = lab.pod("n1p1").netns
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=5"], check=True)
    assert_meshed_as_n1p1(lab, attack(lab, kind), kind)


def test_sendmsg_with_a_destination_on_an_unconnected_tcp_socket_sends_nothing(lab):
    assert attack(lab, "sendmsg_unconnected")["outcome"] in ("BrokenPipeError", "OSError"), \
        "sendmsg without MSG_FASTOPEN must not connect a TCP socket"


def test_a_container_cgroup_created_after_the_pod_was_attached_is_captured(lab):
    pod = lab.pod("n1p1")
    late = f"{pod.cgroup}/late-container"
    os.mkdir(late)
    try:
        assert_meshed_as_n1p1(lab, attack(lab, "plain", cgroup=late), "a late container cgroup")
    finally:
        os.rmdir(late)


@pytest.mark.parametrize("whose", ["its node", "another pod of its node"])
def test_a_socket_bound_to_another_address_is_not_taken_for_its_owner(lab, whose):
    bind_ip = lab.node(1).wire_address if whose == "its node" else lab.pod("n1p2").ip
    result = attack(lab, "freebind", bind_ip=bind_ip)
    assert result["outcome"] == "TimeoutError", \
        f"bound to {whose}'s {bind_ip}, the handshake must never complete (the SYN-ACK goes to the owner): {result}"
