"""The capture modes' factory, the ``none`` mode and the agent-facing wrapper of ``ebpf-connect``.

``build_capture(config, mode, proxy_cgroup)`` builds the mode the composition root chose (agent.app
resolves ``auto`` with the host probes and checks the host first; this package never imports
agent.host). Modes: ``ebpf-connect`` (cgroup hooks; agent.capture.connect_mode), ``ebpf-tc``
(agent.capture.tc_mode) and ``iptables`` (agent.capture.tproxy_mode). ``none`` is the laptop switch:
nothing is captured. The interface they all offer is agent.capture.interface.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable

from agent.capture.interface import Capture, EgressEvents, InboundEnforcement, ListenerRequirements
from agent.capture.origin import Origin
from agent.registry.model import Workload


class NoCapture:
    """``capture.mode: none``: the proxies run, nothing is steered to them (a laptop switch)."""

    name = "none"
    listener = ListenerRequirements()
    inbound = None
    egress = None
    refusals = None

    def set_mesh_destinations(self, workloads: Iterable[Workload], services: Iterable[tuple[str, int]] = (),
                              node_ports: Iterable[tuple[str, int]] = ()) -> None:
        pass

    def start(self) -> None:
        pass

    def attach(self, workload: Workload) -> None:
        pass

    def detach(self, workload: Workload) -> None:
        pass

    def origin(self, sock: socket.socket) -> Origin | None:
        return None

    def stop(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}


class ConnectMode:
    """``ebpf-connect``: cgroup connect4/6 + sockops + getpeername + getsockopt + the node guard
    (agent.capture.connect_mode). Restart-safe and fail-closed: ``stop()`` leaves every program
    attached and pinned; the next start adopts or swaps them with no gap (docs/capture-restart.md)."""

    name = "ebpf-connect"
    listener = ListenerRequirements()
    refusals = None  # refuses at connect() (EPERM, counted in the capture events), never in a node table

    def __init__(self, redirect_ip: str, redirect_port: int, state_dir: str, proxy_cgroup: str,
                 pods_cgroup: str = "", bpffs_dir: str | None = None, passthrough_deny: bool = False,
                 ipv6: bool = True, guard_netns_cookie: int | None = None,
                 admin_endpoint: tuple[str, int] | None = None, guard_scope: str | None = None) -> None:
        from agent.capture.connect_mode import DEFAULT_BPFFS_DIR, ConnectCapture  # no bcc: the loader has it

        self._cgroup_ids: dict[str, int] = {}  # attached pod cgroup path -> cgroup id (inode)

        # mesh_destinations=None: the pinned map keeps what the previous run wrote, or (new maps)
        # captures everything until the first registry snapshot names the mesh (fail closed)
        self._capture = ConnectCapture(redirect_ip=redirect_ip, redirect_port=redirect_port, state_dir=state_dir,
                                       bpffs_dir=bpffs_dir or DEFAULT_BPFFS_DIR, mesh_destinations=None,
                                       passthrough_deny=passthrough_deny, ipv6=ipv6,
                                       guard_netns_cookie=guard_netns_cookie, admin_endpoint=admin_endpoint)
        self._proxy_cgroup = proxy_cgroup
        self._pods_cgroup = pods_cgroup
        self._guard_scope = guard_scope  # where a previous run's guard may be (capture.cgroup_scope)
        self._guard_exempts_host = guard_netns_cookie is not None

    @property
    def inbound(self) -> InboundEnforcement:
        """This mode enforces each pod's inbound mTLS mode in the kernel (set_inbound_mode, plaintext)."""
        return self

    def start(self) -> None:
        import logging

        log = logging.getLogger("tcpmesh.capture")
        self._capture.load()
        kept = self._stale_guards()
        replaced = self._capture.takeover(self._pods_cgroup or None, self._proxy_cgroup)
        for path in kept:  # fail closed: a guard is never removed by a restart, only by `tcpmesh cleanup`
            replaced += self._capture.takeover(path, None)
        pruned = self._capture.prune_pins()
        loaded = self._capture.loader_result
        how = "adopted the pinned set" if self._capture.adopted else (
            f"loaded a new set (loader process: compile {loaded.compile_seconds:.2f}s, "
            f"peak RSS {loaded.max_rss_kb // 1024} MB)" if loaded else "loaded a new set")
        log.info("ebpf-connect: %s %s in %.3fs; replaced %d attachments of older sets, unpinned %d objects; guard %s",
                 how, self._capture.set_dir, self._capture.load_seconds or 0.0, len(replaced), len(pruned),
                 f"on {self._pods_cgroup}" if self._pods_cgroup else
                 "not configured (capture.pods_cgroup is empty)" if kept else "off (capture.pods_cgroup is empty)")
        for path in kept:
            log.warning("ebpf-connect: kept the guard a previous run attached to %s (now on this run's set), "
                        "although capture.pods_cgroup is %s: pods below it that are not captured stay refused. "
                        "To remove it: stop the agent and run `tcpmesh cleanup`", path,
                        repr(self._pods_cgroup) if self._pods_cgroup else "empty")

    def _stale_guards(self) -> list[str]:
        """Guards a previous run left on cgroups other than capture.pods_cgroup (within guard_scope).

        Refuses to start if the agent's own cgroup is below one (its proxy's connects would be refused)."""
        if not self._guard_scope:
            return []
        from agent.errors import EnvironmentProblem

        pods = os.path.realpath(self._pods_cgroup) if self._pods_cgroup else None
        proxy = os.path.realpath(self._proxy_cgroup)
        kept = [path for path in self._capture.guarded_cgroups(self._guard_scope) if path != pods]
        for path in kept:
            if not self._guard_exempts_host and (proxy == path or proxy.startswith(path + os.sep)):
                raise EnvironmentProblem(
                    f"a previous run's node guard is attached to {path}, which contains the agent's cgroup "
                    f"{proxy}: it would refuse the proxy's own connects. Stop the agent and run `tcpmesh cleanup` "
                    "(or set capture.pods_cgroup to where the pods are), then start it again")
        return kept

    def attach(self, workload: Workload) -> None:
        if not workload.cgroup:
            raise MissingCgroup(workload)
        self._capture.attach_pod(workload.cgroup)
        self._cgroup_ids[workload.cgroup] = os.stat(workload.cgroup).st_ino

    def detach(self, workload: Workload) -> None:
        if workload.cgroup:
            self._capture.detach_pod(workload.cgroup)
            cgroup_id = self._cgroup_ids.pop(workload.cgroup, None)
            if cgroup_id is not None:
                self._capture.forget_pod(cgroup_id)

    def set_mesh_destinations(self, workloads: Iterable[Workload], services: Iterable[tuple[str, int]] = (),
                              node_ports: Iterable[tuple[str, int]] = ()) -> None:
        """The registry's workload addresses, Services' (address, port) pairs and (node address,
        nodePort) pairs are the mesh: only connects to them are captured; every other connect leaves
        from the pod itself (or is refused: policy.outbound_passthrough DENY)."""
        from agent.capture.meshdsts import service_destinations, workload_destinations

        self._capture.set_mesh_destinations(workload_destinations(ip for w in workloads for ip in w.addresses)
                                            + service_destinations(services) + service_destinations(node_ports))

    @property
    def egress(self) -> EgressEvents:
        """This mode reports connects outside the mesh from the kernel (egress_reader)."""
        return self

    def egress_reader(self, on_event):
        """The kernel's events of connects outside the mesh (agent.capture.egress.EgressReader)."""
        return self._capture.egress_reader(on_event)

    def set_inbound_mode(self, workload: Workload, strict: bool) -> None:
        """PeerAuthentication in the kernel: STRICT drops plaintext SYNs into the pod (docs/policy.md)."""
        if workload.cgroup:
            self._capture.set_inbound_mode(workload.cgroup, strict)

    def plaintext(self) -> dict[str, tuple[int, int]]:
        """{pod cgroup path: (plaintext SYNs rejected, accepted)} of the attached pods."""
        counts = self._capture.plaintext()
        return {path: counts[cgroup_id] for path, cgroup_id in self._cgroup_ids.items() if cgroup_id in counts}

    def origin(self, sock: socket.socket) -> Origin | None:
        from agent.capture.origin import read_origin

        return read_origin(sock)

    def stop(self) -> None:
        """Release the agent's handles only: pods stay captured and guarded (fail closed)."""
        self._capture.close()

    def counters(self) -> dict[str, int]:
        return self._capture.counters()


class MissingCgroup(Exception):
    def __init__(self, workload: Workload) -> None:
        super().__init__(f"workload {workload.key} has no cgroup in the registry: the ebpf-connect mode captures "
                         "by cgroup; add its cgroup v2 directory to the registry entry")


def build_capture(config, mode: str, proxy_cgroup: str) -> Capture:
    """The capture mode ``mode`` (``config.capture.mode``, with ``auto`` already resolved by the caller).

    ``proxy_cgroup``: the agent's own cgroup v2 directory (the ebpf-connect proxy hook goes there)."""
    from agent.bpf.pins import default_bpffs_dir

    if mode == "none":
        return NoCapture()
    if mode == "ebpf-connect":
        from agent.capture.connect_mode import own_netns_cookie

        exempt = config.capture.guard_exempt_host_network
        _check_pods_cgroup(config.capture.pods_cgroup, proxy_cgroup, exempt)
        return ConnectMode(config.capture.redirect_address, config.proxy.outbound_port, config.state_dir,
                           proxy_cgroup, config.capture.pods_cgroup,
                           config.capture.bpffs_dir or default_bpffs_dir(config.node.name),
                           passthrough_deny=config.policy.outbound_passthrough == "DENY",
                           ipv6=config.capture.ipv6, guard_netns_cookie=own_netns_cookie() if exempt else None,
                           admin_endpoint=(config.admin.address, config.admin.port),
                           guard_scope=config.capture.cgroup_scope or config.capture.cgroup_root)
    if mode == "ebpf-tc":
        from agent.capture.tc_mode import TcCapture  # compiles in a child process: no bcc here

        return TcCapture(config.proxy.bind_address, config.proxy.outbound_port, config.state_dir,
                         passthrough_deny=config.policy.outbound_passthrough == "DENY")
    if mode == "iptables":
        from agent.capture.tproxy_mode import TproxyCapture

        return TproxyCapture(config.proxy.bind_address, config.proxy.outbound_port,
                             passthrough_deny=config.policy.outbound_passthrough == "DENY")
    raise ValueError(f"capture mode {mode!r} is not implemented")


def _check_pods_cgroup(pods_cgroup: str, proxy_cgroup: str, exempt_host_network: bool = False) -> None:
    """The guard on pods_cgroup would refuse the proxy's own connects if the agent lived below it —
    unless it exempts the agent's network namespace (capture.guard_exempt_host_network)."""
    from agent.errors import ConfigError

    if not pods_cgroup:
        return
    if not os.path.isdir(pods_cgroup):
        raise ConfigError("capture.pods_cgroup", pods_cgroup, "does not exist",
                          "give the cgroup v2 directory that contains the pods (create it first)")
    pods, proxy = os.path.realpath(pods_cgroup), os.path.realpath(proxy_cgroup)
    if (proxy == pods or proxy.startswith(pods.rstrip("/") + "/")) and not exempt_host_network:
        raise ConfigError("capture.pods_cgroup", pods_cgroup, f"contains the agent's cgroup {proxy_cgroup}: the "
                          "guard there would refuse the proxy's own upstream connections",
                          "run the agent outside the pods' cgroup (its own systemd unit or container cgroup), or — "
                          "when it runs in the node's network namespace and no workload does (the DaemonSet) — set "
                          "capture.guard_exempt_host_network: true")
