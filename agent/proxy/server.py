"""What both proxies share: their dependencies, the connection tasks they spawn, and the relays
they run — so shutdown can stop accepting, drain open relays for a while, then reset the rest.

The data path reports each flow to what ``FlowMetrics``, ``FlowLog`` and ``SocketStats`` declare;
telemetry implements them (``telemetry.metrics.Metrics``, ``telemetry.flows.FlowTable``,
``telemetry.tcpstats.KernelTcpStats``) and the composition root hands them in. Must not import
``agent.telemetry`` or the CLI: imports point down (the flow record is ``agent.connection``'s).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol

from agent.connection import flow as F
from agent.identity.store import IdentityStore
from agent.policy.source import PolicySource
from agent.proxy.endpoints import Leg
from agent.proxy.kernel_leg import KernelTls
from agent.proxy.limits import ConnectionLimits
from agent.proxy.relay import Relay, RelayResult
from agent.proxy.session import BufferGate
from agent.registry.model import Registry

log = logging.getLogger("tcpmesh.proxy")


class FlowMetrics(Protocol):
    """The counters a flow moves (``telemetry.metrics.Metrics``)."""

    def handshake(self, flow: F.Flow) -> None: ...

    def flow_opened(self, flow: F.Flow) -> None: ...

    def flow_progress(self, flow: F.Flow) -> None: ...

    def flow_closed(self, flow: F.Flow) -> None: ...


class FlowLog(Protocol):
    """Where open and closed flows are recorded (``telemetry.flows.FlowTable``: /debug/flows, access log)."""

    def opened(self, flow: F.Flow) -> None: ...

    def closed(self, flow: F.Flow) -> None: ...


class SocketStats(Protocol):
    """Kernel TCP statistics of a relay's two sockets (``telemetry.tcpstats.KernelTcpStats``)."""

    def flow_started(self, flow: F.Flow, client_leg: Leg, upstream_leg: Leg) -> None: ...


@dataclass
class ProxyContext:
    loop: asyncio.AbstractEventLoop
    node_name: str
    registry: Callable[[], Registry]  # returns the current immutable snapshot
    identities: IdentityStore
    metrics: FlowMetrics
    flows: FlowLog
    inbound_port: int
    connect_timeout: float
    policy: PolicySource | None = None  # None: every mesh connection is allowed
    tasks: set[asyncio.Task] = field(default_factory=set)
    relays: dict[Relay, F.Flow] = field(default_factory=dict)  # running relays and their flows
    tcp_stats: SocketStats | None = None  # registers each flow's sockets
    # agent.proxy.deadlines and agent.proxy.limits (docs/reliability.md); the defaults change nothing
    handshake_timeout: float = 5.0  # inbound: TCP accept → TLS established → first complete OPEN
    tunnel_timeout: float = 0.0  # a tunnel's peer silent this long is lost (keepalive, TCP_USER_TIMEOUT); 0: kernel's
    inbound_idle_timeout: float = 0.0  # an inbound tunnel with no stream this long is closed; 0: never
    limits: dict[str, ConnectionLimits] = field(default_factory=dict)  # reporter → caps; absent: unlimited
    revoked_grace: float = 600.0  # inbound: open streams' time on a tunnel whose credential no longer holds
    handshakes: ConnectionLimits | None = None  # inbound: unauthenticated handshakes by source address; None: no cap
    # the node-wide budget of bytes held for workloads that do not read (agent.proxy.budget); None: no budget
    buffer_gate: BufferGate | None = None
    # nonzero: inbound legs leave from the client pod's own address with this SO_MARK (the return path
    # of agent.capture.source_return is in place); 0: from the node's address (proxy.source_address).
    # IPv4 legs and IPv6 legs apart: the IPv6 return path has its own rule and table, which a kernel may refuse
    source_mark: int = 0
    source_mark6: int = 0
    # who runs the tunnels' TLS (proxy.kernel_tls): its ``leg`` makes each tunnel leg (agent.proxy.kernel_tls)
    kernel_tls: KernelTls = field(default_factory=KernelTls.off)

    def __post_init__(self) -> None:
        self._on_task_done = self._task_done  # one bound method for every task's done callback

    def source_mark_for(self, dest_ip: str) -> int:
        """The SO_MARK a leg to ``dest_ip`` carries when it borrows its client's address; 0: the node's address."""
        return self.source_mark6 if ":" in dest_ip else self.source_mark

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a connection task; a done callback (not a wrapping coroutine: one frame less per
        connection) forgets it and logs what it raised."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, Exception):  # a task root: one connection's bug must not take the agent down
            log.error("connection task failed", exc_info=exc)

    def start_relay(self, relay: Relay, flow: F.Flow, a_leftover: bytes = b"",
                    b_leftover: bytes = b"") -> "asyncio.Future[RelayResult]":
        """Start ``relay`` (a = client side) and return its future; the connection task awaits it, then
        calls ``end_relay`` in a ``finally`` (a plain call, not a coroutine: one frame less per open
        connection, and no done callback, which would cost as much)."""
        self.relays[relay] = flow
        self.metrics.handshake(flow)
        if self.tcp_stats is not None:
            self.tcp_stats.flow_started(flow, relay.a, relay.b)
        return relay.start(a_leftover, b_leftover)

    def end_relay(self, relay: Relay, flow: F.Flow) -> None:
        """The relay ended (or its task was cancelled): forget it and put the byte counts on the flow."""
        self.relays.pop(relay, None)
        done = relay.done
        if not done.done() or done.cancelled():
            return
        result = done.result()
        flow.bytes_received, flow.bytes_sent = result.a_to_b, result.b_to_a
        if result.error:
            flow.fail(F.FLAG_CONNECTION_TERMINATED, result.error)

    def flow_opened(self, flow: F.Flow) -> None:
        self.flows.opened(flow)
        self.metrics.flow_opened(flow)

    def flow_closed(self, flow: F.Flow) -> None:
        flow.close()
        self.flows.closed(flow)
        self.metrics.flow_closed(flow)

    def report_progress(self, relays: list[tuple[Relay, F.Flow]] | None = None) -> None:
        """Copy the running relays' byte counts onto their flows and the counters (live telemetry)."""
        for relay, flow in (list(self.relays.items()) if relays is None else relays):
            flow.bytes_received, flow.bytes_sent = relay.a_to_b, relay.b_to_a
            self.metrics.flow_progress(flow)

    async def report_forever(self, interval: float, slice_size: int = 256) -> None:
        """Live reporting: open flows' bytes reach the metrics and flow records every ``interval`` s,
        in slices, so that many open flows never hold the loop for long."""
        while True:
            await asyncio.sleep(interval)
            try:
                running = list(self.relays.items())
                for start in range(0, len(running), slice_size):
                    if start:
                        await asyncio.sleep(0)
                    self.report_progress([(r, f) for r, f in running[start:start + slice_size] if r in self.relays])
            except Exception:  # a task root: one bad report must not end live reporting
                log.exception("live flow report failed")

    def cut(self, workloads: set[tuple[str, str]], reason: str) -> int:
        """Reset at once every open relay whose source or destination is one of ``workloads``
        ((namespace, name) of local workloads that left the registry); each is recorded DC with
        ``reason``. Returns how many were cut."""
        cut = 0
        for relay, flow in list(self.relays.items()):
            if (flow.source_namespace, flow.source_workload) in workloads or \
                    (flow.destination_namespace, flow.destination_workload) in workloads:
                relay.abort(reason)
                cut += 1
        return cut

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for open relays to finish, then reset the rest."""
        deadline = self.loop.time() + seconds
        while self.relays and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays):
            relay.abort("agent shutting down")
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
