"""The benchmark's world: a two-node lab, cgroups for every role, certificates, servers and tunnels.

``World`` is a context manager; leaving it (also on an error, Ctrl-C or SIGTERM) stops every
process it started — only those, by their Popen handle — tears the lab down with ``lab_down``,
removes its cgroups and its temporary directory.

Layout (pod names from the lab): the client runs in n1p1's netns, the servers in n2p1's.
  direct   client in cgroup <bench>/client (not captured) → 10.77.2.11 (routed through both nodes)
  tcpmesh  client in n1p1's pod cgroup (captured) → agent node1 → mTLS → agent node2 → 10.77.2.11
  stunnel  client in <bench>/client → 169.254.1.1:2100x (stunnel on node1) → TLS → node2 → 10.77.2.11
  haproxy  same with HAProxy on 2200x
Each tunnel process runs in its own cgroup <bench>/<peer>-<node>, the servers in <bench>/server,
so CPU and memory are read per role from cgroups.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.lab.realservers import PG_PORT, REDIS_PORT
from bench import host, loadgen, peers

LAB_PREFIX = "bench"
TRUST_DOMAIN = "bench.tcpmesh"
CLIENT_POD = "n1p1"
SERVER_POD = "n2p1"
LOCAL_CLIENT_POD = "n2p2"  # the same-node scenario's client: on node2, with the server
OUTBOUND_PORT = 15001
DATABASE_PORTS = {"postgres": PG_PORT, "redis": REDIS_PORT}  # the database scenario's (bench/databases.py)
OWNER_DIR = Path("/run/tcpmesh-bench")  # <lab>.json: which process owns which bench lab
PR_SET_PDEATHSIG = 1
# The connection-rate test makes tens of thousands of short connections: reuse TIME_WAIT ports.
# Pods and nodes pick ephemeral ports from disjoint ranges. tcpmesh's inbound legs borrow the client
# pod's address (docs/capture-source-address.md): node2 holds sockets, TIME_WAIT ones included, for
# (10.77.1.11, port) -> server. The direct path's connections come from that same address, but their
# ports are picked in the pod's netns. Were a direct connection to pick a port node2's agent used within
# the last 60 s for the same server and port, node2's early demux would attach the agent's TIME_WAIT
# socket to the server's SYN-ACK, and ip_forward drops a packet that has a socket: the direct
# connection hangs (issue #19: "no connection completed through direct"). Disjoint ranges make those
# tuples distinct. The capture test's uncaptured sockets bind below 10000 (bench/loadgen.c).
TW_REUSE = {"net.ipv4.tcp_tw_reuse": "1"}
POD_SYSCTLS = {**TW_REUSE, "net.ipv4.ip_local_port_range": "10000 49999"}
NODE_SYSCTLS = {**TW_REUSE, "net.ipv4.ip_local_port_range": "50000 65535"}


@dataclass(frozen=True)
class Path_:
    """One way from the client to the server."""

    name: str
    client_netns: str
    client_cgroup: str
    echo: tuple[str, int]
    bulk: tuple[str, int]
    datapath_cgroups: tuple[str, ...]  # empty for the direct path


@dataclass
class World:
    workdir_parent: str | None = None
    peers_wanted: tuple[str, ...] = tuple(peers.PORT_BASE)
    log: Any = print
    name: str = field(default_factory=lambda: f"{LAB_PREFIX}-{uuid.uuid4().hex[:6]}")
    ready_timeout: float = 60.0  # for the lab's agents (agent/lab/agents.py's default); longer in emulated guests
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "World":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _setup(self) -> None:
        from agent.host import checks
        from agent.lab import lab as labops

        self.workdir = Path(tempfile.mkdtemp(prefix="tcpmesh-bench-", dir=self.workdir_parent))
        self.lab_started = False
        self.cgroup_root = ""
        self.peer_layouts: dict[str, peers.PeerLayout] = {}
        self.failed_peers: dict[str, str] = {}
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # agents and tunnels inherit it: 1,000+ fds
        self.binary = loadgen.build(self.workdir)
        mount = checks.find_cgroup2_mount()
        if mount is None:
            raise RuntimeError("cgroup v2 is not mounted")
        self.cgroup_root = os.path.join(mount, f"tcpmesh-bench-{self.name}")
        clean_stale_runs(self.log)
        self.owner_marker = _write_owner(self.name, self.cgroup_root)
        self.log(f"lab {self.name}: up (2 nodes, 2 pods each, agents with ebpf-connect capture)")
        self.lab_started = True
        self.plan = labops.lab_up(self.name, 2, 2, TRUST_DOMAIN, ready_timeout=self.ready_timeout)
        self.client_pod = self.plan.pod(CLIENT_POD)
        self.server_pod = self.plan.pod(SERVER_POD)
        self.local_client_pod = self.plan.pod(LOCAL_CLIENT_POD)
        self.node1, self.node2 = self.plan.nodes[0], self.plan.nodes[1]
        for netns in (self.client_pod.netns, self.server_pod.netns, self.local_client_pod.netns):
            host.set_netns_sysctls(netns, POD_SYSCTLS)
        for netns in (self.node1.netns, self.node2.netns):
            host.set_netns_sysctls(netns, NODE_SYSCTLS)
        for leaf in ("client", "server", *(f"{p}-{n}" for p in self.peers_wanted for n in ("node1", "node2"))):
            os.makedirs(self.cgroup(leaf), exist_ok=True)
        self.echo_server = self.start(loadgen.serve_argv(self.binary), self.server_pod.netns, self.cgroup("server"),
                                      stdout=subprocess.DEVNULL)
        host.wait_listening(self.echo_server, [loadgen.ECHO_PORT], what="the echo server")
        if self.peers_wanted:
            self._start_peers()

    def close(self) -> None:
        from agent.lab import lab as labops

        for proc in list(reversed(self.procs)):
            self.stop(proc)
        problems = []
        if getattr(self, "lab_started", False):
            try:
                labops.lab_down(self.name)
            except Exception as exc:  # report, keep cleaning
                problems.append(f"lab down {self.name}: {exc}")
        if self.cgroup_root and os.path.isdir(self.cgroup_root):
            from agent.lab.cgroups import remove_tree
            busy = remove_tree(self.cgroup_root)
            if busy:
                problems.append(f"cgroups still busy: {busy}")
        if getattr(self, "workdir", None) is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if not problems and getattr(self, "owner_marker", None) is not None:
            self.owner_marker.unlink(missing_ok=True)
        if problems:
            raise RuntimeError("; ".join(problems))

    # ------------------------------------------------------------------------------- processes

    def cgroup(self, leaf: str) -> str:
        return os.path.join(self.cgroup_root, leaf)

    def start(self, argv: list[str], netns: str, cgroup: str, **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in ``netns`` and ``cgroup``; it gets SIGTERM if this process dies, however it dies."""
        from agent.lab.nsenter import preexec

        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        enter = preexec(netns, cgroup)
        try:
            proc = subprocess.Popen(argv, preexec_fn=_ChildSetup(enter, os.getpid()), **popen_kwargs)
        finally:
            enter.close()
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], netns: str, cgroup: str, timeout: float) -> str:
        """Run a client to completion; its stdout. Raises with its stderr on a non-zero exit."""
        proc = self.start(argv, netns, cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{Path(argv[0]).name} {argv[1]} did not finish within {timeout:.0f} s")
        finally:
            if proc in self.procs and proc.poll() is not None:
                self.procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} exited {proc.returncode}: {(err or out).strip()[-400:]}")
        return out

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if proc in self.procs:
            self.procs.remove(proc)

    # ------------------------------------------------------------------------------- the peers

    def _start_peers(self) -> None:
        from agent.identity.ca import load_ca

        ca = load_ca(self.plan.ca_dir)
        certs = self.workdir / "certs"
        certs.mkdir(mode=0o700)
        ca_file = certs / "ca.crt"
        shutil.copyfile(os.path.join(self.plan.ca_dir, "ca.crt"), ca_file)
        for peer in self.peers_wanted:
            try:
                self._start_peer(peer, ca, certs, ca_file)
            except (RuntimeError, OSError) as exc:
                self.failed_peers[peer] = str(exc)
                self.log(f"{peer} could not start, left out: {exc}")

    def _start_peer(self, peer: str, ca, certs: Path, ca_file: Path) -> None:
        from agent.identity.spiffe import SpiffeId
        from agent.identity.issue import issue_svid

        cert_file, key_file, combined, logs = {}, {}, {}, {}
        for node in ("node1", "node2"):
            svid = issue_svid(ca, SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{peer}-{node}"), 86400)
            cert_file[node] = str(certs / f"{peer}-{node}.crt")
            key_file[node] = str(certs / f"{peer}-{node}.key")
            combined[node] = str(certs / f"{peer}-{node}.pem")
            logs[node] = str(self.workdir / f"{peer}-{node}.log")
            _write_private(cert_file[node], svid.full_chain_pem)
            _write_private(key_file[node], svid.key_pem)
            _write_private(combined[node], svid.full_chain_pem + svid.key_pem)
        layout = peers.PeerLayout(
            node2_address=self.node2.wire_address,
            services=peers.layout_services(peer, self.server_pod.ip, loadgen.ECHO_PORT, loadgen.BULK_PORT,
                                            DATABASE_PORTS),
            ca_file=str(ca_file), cert_file=cert_file, key_file=key_file, combined_file=combined, log_file=logs)
        self.peer_layouts[peer] = layout
        for node_plan in (self.node2, self.node1):
            node = node_plan.name
            text = peers.stunnel_config(layout, node) if peer == "stunnel" else peers.haproxy_config(layout, node)
            config = self.workdir / f"{peer}-{node}.conf"
            config.write_text(text)
            log = open(logs[node], "ab")
            try:
                proc = self.start(peers.argv(peer, str(config)), node_plan.netns, self.cgroup(f"{peer}-{node}"),
                                  stdout=log, stderr=subprocess.STDOUT)
            finally:
                log.close()
            try:
                host.wait_listening(proc, peers.listen_ports(layout, node), what=f"{peer} on {node}")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; its log ends:\n{self.peer_log_tail(peer, 8)}") from None

    def peer_log_tail(self, peer: str, lines: int = 5) -> str:
        out = []
        for node in ("node1", "node2"):
            path = self.workdir / f"{peer}-{node}.log"
            if path.exists():
                out += [f"{peer}-{node}: {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    # ------------------------------------------------------------------------------- the paths

    def paths(self, wanted: tuple[str, ...]) -> dict[str, Path_]:
        server = self.server_pod.ip
        gateway = self.plan.pod_gateway
        out = {}
        for name in wanted:
            if name in self.failed_peers:
                continue
            if name == "direct":
                out[name] = Path_(name, self.client_pod.netns, self.cgroup("client"), (server, loadgen.ECHO_PORT),
                                  (server, loadgen.BULK_PORT), ())
            elif name == "tcpmesh":
                out[name] = Path_(name, self.client_pod.netns, self.client_pod.cgroup, (server, loadgen.ECHO_PORT),
                                  (server, loadgen.BULK_PORT), (self.node1.agent_cgroup, self.node2.agent_cgroup))
            else:
                services = {s.name: s for s in self.peer_layouts[name].services}
                out[name] = Path_(name, self.client_pod.netns, self.cgroup("client"),
                                  (gateway, services["echo"].client_port), (gateway, services["bulk"].client_port),
                                  (self.cgroup(f"{name}-node1"), self.cgroup(f"{name}-node2")))
        return out

    def address(self, path: Path_, service: str, server_port: int) -> tuple[str, int]:
        """Where ``path``'s client connects to reach the server pod's ``server_port`` (``service`` of
        the peers' layout, e.g. "postgres"): the server pod itself, or the peer's port on node1."""
        if path.name in self.peer_layouts:
            services = {s.name: s for s in self.peer_layouts[path.name].services}
            return self.plan.pod_gateway, services[service].client_port
        return self.server_pod.ip, server_port

    def same_node_paths(self) -> dict[str, Path_]:
        """Client pod n2p2 to the server pod n2p1, both on node2: straight (plaintext through node2's
        bridge) and through node2's agent alone (agent.proxy.local, or its tunnel to itself)."""
        client, server = self.local_client_pod, self.server_pod.ip
        echo, bulk = (server, loadgen.ECHO_PORT), (server, loadgen.BULK_PORT)
        return {"direct": Path_("direct-same-node", client.netns, self.cgroup("client"), echo, bulk, ()),
                "tcpmesh": Path_("tcpmesh-same-node", client.netns, client.cgroup, echo, bulk,
                                 (self.node2.agent_cgroup,))}

    @property
    def server_cgroup(self) -> str:
        return self.cgroup("server")

    def agent_pids(self) -> list[int]:
        return [pid for node in (self.node1, self.node2) for pid in host.cgroup_pids(node.agent_cgroup)]


class _ChildSetup:
    """preexec_fn: enter the cgroup and netns, then ask the kernel to SIGTERM us when the bench dies."""

    def __init__(self, enter, parent_pid: int) -> None:
        self.enter = enter
        self.parent_pid = parent_pid
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded in the parent, not after fork

    def __call__(self) -> None:
        self.enter()
        self.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.parent_pid:  # the bench died before prctl took effect
            os._exit(1)


# ------------------------------------------------------------------------- runs that died (SIGKILL)

def _starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _write_owner(name: str, cgroup_root: str) -> Path:
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    marker = OWNER_DIR / f"{name}.json"
    marker.write_text(json.dumps({"pid": os.getpid(), "starttime": _starttime(os.getpid()), "lab": name,
                                  "cgroup_root": cgroup_root}))
    return marker


def clean_stale_runs(log=print) -> list[str]:
    """Tear down the lab and cgroups of earlier bench runs whose process is gone (killed with SIGKILL,
    a machine crash). Their own processes already got SIGTERM from the kernel (PR_SET_PDEATHSIG);
    lab_down stops only the agents their lab recorded. Runs of a live bench are left alone."""
    from agent.lab import lab as labops
    from agent.lab.cgroups import remove_tree

    cleaned = []
    for marker in sorted(OWNER_DIR.glob("*.json")) if OWNER_DIR.is_dir() else []:
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("starttime") is not None and _starttime(owner["pid"]) == owner["starttime"]:
            continue  # that bench still runs
        log(f"cleaning up after an earlier bench run that died: lab {owner['lab']}")
        try:
            labops.lab_down(owner["lab"])
            if owner.get("cgroup_root") and os.path.isdir(owner["cgroup_root"]):
                _kill_cgroup(owner["cgroup_root"])
                remove_tree(owner["cgroup_root"])
            marker.unlink()
            cleaned.append(owner["lab"])
        except Exception as exc:  # leave the marker: the next run tries again
            log(f"could not clean up lab {owner['lab']}: {exc}")
    return cleaned


def _kill_cgroup(root: str, timeout: float = 5.0) -> None:
    """SIGKILL what is left in a dead run's cgroup tree: processes that dropped the parent-death
    signal when they changed user (PostgreSQL under setpriv). Only that run's own processes live there."""
    kill = Path(root, "cgroup.kill")
    if not kill.exists():
        return
    kill.write_text("1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(host.cgroup_pids(str(d)) for d in [Path(root), *Path(root).rglob("*")]
                                              if d.is_dir()):
        time.sleep(0.05)


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def wait_gone(seconds: float) -> None:
    """A pause that lets closed connections finish their teardown before the next measurement."""
    time.sleep(seconds)
