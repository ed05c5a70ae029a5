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
import socket
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from agent.capture.modes import MissingCgroup, build_capture
from agent.config import Config
from agent.errors import KernelError, TcpmeshError
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
IP_TRANSPARENT = 19


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

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        config = self.config
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
            self.capture = build_capture(config)
            self.capture.start()
            outbound = OutboundProxy(ctx, self.capture.origin)
            inbound = InboundProxy(ctx)
            outbound_sock = listening_socket(config.proxy.bind_address, config.proxy.outbound_port,
                                             transparent=self.capture.listener.transparent)
            inbound_sock = listening_socket(config.proxy.bind_address, config.proxy.inbound_port)
            self.state.servers = [
                await loop.create_server(outbound.protocol_factory, sock=outbound_sock),
                await loop.create_server(inbound.protocol_factory, sock=inbound_sock),
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
            try:
                self.capture.attach(workload)
            except MissingCgroup as exc:
                log.warning("%s; its connections are not captured", exc)
                continue
            count += 1
        return count

    def _detach_capture(self) -> None:
        if self.capture is not None:
            self.capture.stop()
            self.capture = None

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    def stop(self) -> None:
        self._stop.set()


LISTEN_BACKLOG = 4096


def listening_socket(address: str, port: int, transparent: bool = False) -> socket.socket:
    """A bound, listening TCP socket; IP_TRANSPARENT when the capture mode delivers foreign destinations."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError("listen", f"{address}:{port}", exc.errno,
                          "is another agent or program using this port?") from exc
    return sock
