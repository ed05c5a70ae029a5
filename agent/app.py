"""The composition root: the one place where the agent is built from its config and wired together.

``Agent.run()`` loads the registry, the CA and the capture programs, starts the proxies and the
admin endpoint, attaches capture to the local pods, then waits for SIGTERM/SIGINT: it stops
capturing, stops accepting, drains open connections, detaches and returns. Nothing is global.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from agent import hostcheck
from agent.config import Config
from agent.errors import TcpmeshError
from agent.identity.ca import load_ca
from agent.identity.store import IdentityStore
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.server import ProxyContext
from agent.registry.model import Registry
from agent.registry.static_file import load_registry_file
from agent.telemetry.admin import AdminServer
from agent.telemetry.flows import FlowTable
from agent.telemetry.metrics import Metrics

log = logging.getLogger("tcpmesh.agent")


@dataclass
class AgentState:
    registry: Registry
    ready: bool = False
    servers: list[asyncio.base_events.Server] = field(default_factory=list)


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.prometheus = CollectorRegistry()
        self.metrics = Metrics(self.prometheus)
        self.flows = FlowTable()
        self.capture = None
        self.admin: AdminServer | None = None
        self.state: AgentState | None = None
        self._stop = asyncio.Event()

    # -- building -----------------------------------------------------------------------------
    def _check_host(self) -> None:
        if self.config.capture.mode == "ebpf-connect":
            hostcheck.require(hostcheck.root_problem(), hostcheck.cgroup2_problem(self.config.capture.cgroup_root),
                              hostcheck.bcc_problem())

    def _build_capture(self):
        if self.config.capture.mode == "none":
            return None
        from agent.capture.connect_mode import ConnectCapture  # imports bcc: only when capturing

        capture = ConnectCapture(
            redirect_ip=self.config.capture.redirect_address,
            redirect_port=self.config.proxy.outbound_port,
            capture_cidrs=["0.0.0.0/0"],
            state_dir=self.config.state_dir,
        )
        capture.load()
        proxy_cgroup = self.config.capture.proxy_cgroup or hostcheck.own_cgroup_path(self.config.capture.cgroup_root)
        capture.attach_proxy(proxy_cgroup)
        return capture

    def _origin_reader(self):
        if self.config.capture.mode == "none":
            return lambda sock: None
        from agent.capture.origin import read_origin

        return read_origin

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        config = self.config
        self._check_host()
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        registry = load_registry_file(config.registry.file, config.trust_domain)
        if config.node.name not in registry.nodes:
            raise TcpmeshError(f"node.name {config.node.name!r} is not a node of the registry {config.registry.file}; "
                               f"known nodes: {', '.join(sorted(registry.nodes)) or 'none'}")
        self.state = AgentState(registry)
        ca = load_ca(config.identity.ca_dir)
        identities = IdentityStore(ca, ca.cert_pem, config.identity.svid_ttl_seconds, key_dir=config.state_dir)
        identities.ensure(registry.identities_on(config.node.name))

        loop = asyncio.get_running_loop()
        ctx = ProxyContext(loop=loop, node_name=config.node.name, registry=lambda: self.state.registry,
                           identities=identities, metrics=self.metrics, flows=self.flows,
                           inbound_port=config.proxy.inbound_port,
                           connect_timeout=config.proxy.connect_timeout_seconds)
        self.admin = AdminServer(config.admin.address, config.admin.port, self.prometheus,
                                 is_ready=lambda: bool(self.state and self.state.ready), flows=self.flows.snapshot)
        self.admin.start()
        try:
            self.capture = self._build_capture()
            outbound = OutboundProxy(ctx, self._origin_reader())
            inbound = InboundProxy(ctx)
            self.state.servers = [
                await loop.create_server(outbound.protocol_factory, config.proxy.bind_address,
                                         config.proxy.outbound_port, reuse_address=True),
                await loop.create_server(inbound.protocol_factory, config.proxy.bind_address,
                                         config.proxy.inbound_port, reuse_address=True),
            ]
            attached = self._attach_local_pods(registry)
            self.metrics.workloads.set(attached)
            self.state.ready = True
            self.metrics.ready.set(1)
            log.info("agent ready on node %s: %d local workloads captured (%s), outbound :%d, inbound :%d, admin %s:%d",
                     config.node.name, attached, config.capture.mode, config.proxy.outbound_port,
                     config.proxy.inbound_port, config.admin.address, config.admin.port)
            self._install_signal_handlers(loop)
            await self._stop.wait()
            log.info("stopping: detaching capture, draining connections for up to %.1fs", config.proxy.drain_seconds)
            self.state.ready = False
            self.metrics.ready.set(0)
            self._detach_capture()
            for server in self.state.servers:
                server.close()
            await ctx.drain(config.proxy.drain_seconds)
        finally:
            self._detach_capture()
            if self.admin is not None:
                self.admin.stop()
        log.info("agent stopped")

    def _attach_local_pods(self, registry: Registry) -> int:
        count = 0
        for workload in registry.local(self.config.node.name):
            if self.capture is None:
                continue
            if not workload.cgroup:
                log.warning("workload %s has no cgroup in the registry: its connections are not captured",
                            workload.key)
                continue
            self.capture.attach_pod(workload.cgroup)
            count += 1
        return count

    def _detach_capture(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    def stop(self) -> None:
        self._stop.set()
