"""Helpers of the bpf tier: sockets and processes that live in a given netns and cgroup.

Imported by tests/bpf/conftest.py and the tests (pytest puts tests/bpf on sys.path).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

NODE_IP = "10.200.1.1"
POD_IP = "10.200.1.2"
REDIRECT_PORT = 15001
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
# The tier's mesh: every destination in 10.77.0.0/16 is a workload (tcpmesh_mesh_dsts); anything
# else a test dials is outside the mesh, never redirected.
MESH_PREFIX = "10.77.0.0/16"
MESH_PREFIX6 = "fd00:77::/48"  # the same for IPv6 (dual stack)


def mesh_capture(*args, **kwargs):
    """A ConnectCapture whose mesh is MESH_PREFIX (the tier's usual world)."""
    from agent.capture import ConnectCapture
    from agent.capture.meshdsts import destination

    kwargs.setdefault("mesh_destinations", [destination(MESH_PREFIX), destination(MESH_PREFIX6)])
    return ConnectCapture(*args, **kwargs)


# ---- the node/pod pair -------------------------------------------------------------------------

def plumb_node_and_pod(node_ns: str, pod_ns: str, host_if: str, pod_if: str) -> None:
    """Create ``node_ns`` and ``pod_ns`` joined by a veth: NODE_IP on the node side, POD_IP in the pod,
    the pod's default route via the node, lo up in both. The caller removes both namespaces (the veth
    goes with them), also when this raises halfway."""
    from pyroute2 import IPRoute, netns

    netns.create(node_ns)
    netns.create(pod_ns)
    with IPRoute(netns=node_ns) as node, IPRoute(netns=pod_ns) as pod:
        node.link("add", ifname=host_if, kind="veth", peer={"ifname": pod_if, "net_ns_fd": pod_ns})
        h = node.link_lookup(ifname=host_if)[0]
        p = pod.link_lookup(ifname=pod_if)[0]
        node.addr("add", index=h, address=NODE_IP, prefixlen=24)
        pod.addr("add", index=p, address=POD_IP, prefixlen=24)
        for ipr, idx in ((node, h), (pod, p)):
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        pod.route("add", dst="0.0.0.0/0", gateway=NODE_IP)


def remove_namespaces(*names: str | None) -> None:
    """Remove each named netns that exists (its veths go with it)."""
    from pyroute2 import netns

    for name in names:
        if name and os.path.exists(f"{NETNS_DIR}/{name}"):
            try:
                netns.remove(name)
            except OSError:
                pass


# ---- the proxy stand-in ------------------------------------------------------------------------

class Acceptor:
    """Accepts on ``address`` in a netns (its socket made by a process in ``cgroup``, or in the test's
    own), hands each connection to ``handle`` on a thread, and closes it."""

    def __init__(self, netns_file: str, cgroup: Path | None, address: tuple[str, int], backlog: int = 1024) -> None:
        self.sock = socket_in(netns_file, cgroup)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                self.handle(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class OriginAcceptor(Acceptor):
    """Accepts on the redirect port in a node netns, from the proxy's cgroup, asks each connection for
    its origin once (the one getsockopt the proxy makes), records ``(dst ip, dst port)`` or None, and
    closes it."""

    def __init__(self, netns_file: str, proxy_cgroup: Path, backlog: int = 1024) -> None:
        from agent.capture import read_origin

        self._read_origin = read_origin
        self.origins: list[tuple[str, int] | None] = []
        super().__init__(netns_file, proxy_cgroup, ("0.0.0.0", REDIRECT_PORT), backlog)

    def handle(self, conn: socket.socket) -> None:
        origin = self._read_origin(conn)
        self.origins.append(None if origin is None else (origin.dst_ip, origin.dst_port))

    def close(self) -> list[tuple[str, int] | None]:
        time.sleep(0.2)  # let the last accepted ones be read
        self.stop()
        return self.origins


# ---- sockets and processes inside a netns (and a cgroup) ----------------------------------------

_MAKE_SOCKET = r"""
import socket, sys
parent = socket.socket(fileno=int(sys.argv[1]))
sock = socket.socket(socket.AF_INET, int(sys.argv[2]))
socket.send_fds(parent, [b"s"], [sock.fileno()])
"""


def _enter(netns_file: str | None, cgroup: Path | None):
    """A preexec_fn: join the cgroup first (hooks bind to a socket at creation), then the netns."""
    def enter() -> None:
        if cgroup is not None:
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write("0")
        if netns_file is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_file, os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(120)
            os.close(fd)
    return enter


def socket_in(netns_file: str, cgroup: Path | None, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket created in ``netns_file`` by a process in ``cgroup``, handed back over SCM_RIGHTS.

    The socket keeps both its netns and its cgroup, whoever uses it afterwards — so the test
    process can act as the proxy without ever joining the proxy's cgroup itself.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run([sys.executable, "-c", _MAKE_SOCKET, str(theirs.fileno()), str(int(kind))],
                              preexec_fn=_enter(netns_file, cgroup), pass_fds=(theirs.fileno(),),
                              timeout=10, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
        ours.settimeout(5)
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    return socket.socket(fileno=fds[0])


_CLIENT = r"""
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(15, b"tm-client", 0, 0, 0)  # PR_SET_NAME: a comm the test can check
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"pid": os.getpid(), "comm": open("/proc/self/comm").read().strip()}
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
s.settimeout(timeout)
try:
    s.connect((ip, port))
    out.update(ok=True, peer=list(s.getpeername())[:2], local=list(s.getsockname())[:2])
except OSError as exc:
    out.update(ok=False, errno=exc.errno, error=str(exc))
print(json.dumps(out), flush=True)
sys.stdin.read()  # hold the connection until the test closes stdin
"""


def accept(listener: socket.socket, timeout: float = 3.0) -> socket.socket | None:
    """One connection from a non-blocking listener within ``timeout``, made blocking; None if none came."""
    ready, _, _ = select.select([listener], [], [], timeout)
    if not ready:
        return None
    conn, _ = listener.accept()
    conn.setblocking(True)
    return conn


class Client:
    """A process that connects once from inside a netns/cgroup and reports what it saw."""

    def __init__(self, netns_file: str, cgroup: Path | None, ip: str, port: int, timeout: float = 1.5) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CLIENT, ip, str(port), str(timeout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_enter(netns_file, cgroup))
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise AssertionError(f"client died: {self.proc.stderr.read().decode()}")
        self.result = json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # our own child
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


_LOOP = r"""
import json, select, socket, sys, time
ip, port, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
results = []
while not select.select([0], [], [], 0)[0]:  # until the test writes to (or closes) stdin
    s = socket.socket()
    s.settimeout(2)
    started = time.time()
    try:
        s.connect((ip, port))
        results.append([started, 0])
    except OSError as exc:
        results.append([started, exc.errno or -1])
    finally:
        s.close()
    if len(results) == 1:
        print("running", flush=True)   # the constructor waits for this: one attempt made
    time.sleep(pause)
print(json.dumps(results), flush=True)
"""


class LoopClient:
    """A process in a netns/cgroup that connects to ip:port over and over until stopped.

    ``stop()`` returns [(start time, errno or 0)] per attempt (time.time() clock).
    """

    def __init__(self, netns_file: str, cgroup: Path | None, ip: str, port: int, pause: float = 0.002) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LOOP, ip, str(port), str(pause)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_enter(netns_file, cgroup))
        # Started means attempting: a slow machine (an emulated VM: seconds of interpreter start)
        # must not leave the window a test measures without a single attempt in it.
        if self.proc.stdout.readline().strip() != b"running":
            self.proc.kill()
            raise AssertionError(f"the loop client did not start: {self.proc.communicate()[1].decode()[-500:]}")

    def stop(self) -> list[tuple[float, int]]:
        try:
            out, err = self.proc.communicate(b"x", timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child
            self.proc.communicate()
            raise AssertionError("the loop client did not stop")
        assert self.proc.returncode == 0, err.decode()
        return [(t, e) for t, e in json.loads(out.splitlines()[-1])]
