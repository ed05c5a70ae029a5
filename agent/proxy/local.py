"""The same-node path: a captured connection whose destination workload runs on this node.

Cross-node, a connection goes outbound proxy → mTLS tunnel → the destination node's inbound proxy →
workload. When the destination is on this node, that tunnel would run from the node to itself: its
bytes never leave the host kernel, so encryption protects nothing, yet its TLS, framing and second
proxy hop cost most of the latency a database client feels. Here the outbound proxy does what the
inbound proxy would do, in process, with the same facts:

- the source identity is the one the capture and the registry give the client pod (the identity the
  outbound proxy would present in the tunnel), the destination the registry's workload at the
  original destination (what secure naming checks cross-node); the node must hold both identities'
  SVIDs (cross-node the tunnel could not be made without them), or the connection is refused;
- authorization: agent.proxy.authorize, the function the inbound proxy asks; destination connection
  caps (proxy.max_connections*) as the inbound side counts them;
- the workload is dialled from the client pod's own address where proxy.source_address gives it
  (agent.proxy.upstream, as the inbound proxy does), so servers and STRICT mode see what they see
  cross-node (the leg is opened by the agent's cgroup, which tcpmesh_pxops records);
- both records as today: the source reporter's (the outbound flow, opened before the destination is
  asked) and the destination reporter's (opened once the workload accepted), same flow id, same
  identities, ``connection_security_policy`` ``mutual_tls`` (the identities are the mesh's, proven
  the same way the tunnel's certificates are issued; docs/performance-latency.md "Same-node
  connections"), the same response flags and details a refusal gets cross-node.

The bytes then move through agent.proxy.relay between the two plain sockets; a kernel path for
them (sk_msg redirect between the pods' own sockets) is measured in docs/performance-latency.md and
not built. Must not import agent.proxy.outbound (which imports this) or any telemetry module.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from agent.connection import flow as F
from agent.identity.errors import IdentityError
from agent.proxy.authorize import authorized
from agent.proxy.endpoints import PlainLeg
from agent.proxy.header import Status, StatusReply
from agent.proxy.relay import Relay
from agent.proxy.routing import OutboundRoute, dialled_service
from agent.proxy.server import ProxyContext
from agent.proxy.upstream import SourceRefused, connect, source_for
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.local")

def _paused_leg() -> PlainLeg:
    return PlainLeg(start_paused=True)


class _NoLeg:
    """Stands for the tunnel leg a same-node flow does not have (kernel TCP stats register no socket)."""

    @staticmethod
    def socket() -> None:
        return None


NO_LEG = _NoLeg()


class _DestinationView:
    """The destination record's entry among the context's running relays: the same bytes, the same end,
    read in the destination reporter's direction (a = the client side, as the inbound proxy's relay)."""

    def __init__(self, mover) -> None:
        self._mover = mover
        self.a = NO_LEG
        self.b = NO_LEG
        self.done = mover.done

    @property
    def a_to_b(self) -> int:
        return self._mover.a_to_b

    @property
    def b_to_a(self) -> int:
        return self._mover.b_to_a

    def abort(self, reason: str) -> None:
        self._mover.abort(reason)


class SameNodePath:
    """Serves connections routed to a workload of this node (``applies``), in process."""

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx

    def applies(self, route: OutboundRoute) -> bool:
        return route.destination is not None and route.destination.node == self._ctx.node_name

    async def serve(self, app: PlainLeg, route: OutboundRoute, flow: F.Flow) -> None:
        """``flow`` is the source record (facts, identities, service set by the outbound proxy; not yet
        opened). Returns when the connection has ended; the caller closes ``flow``."""
        ctx = self._ctx
        source, destination = route.source, route.destination
        assert source is not None and destination is not None
        ctx.flow_opened(flow)
        missing = self._svid_problem("source", source)
        if missing:  # as the tunnel path: no SVID to present, no destination asked, no destination record
            flow.fail(F.FLAG_NO_IDENTITY, f"no SVID for {source.spiffe_id.uri} on this node yet: {missing}")
            log.warning("flow %s from %s refused: %s", flow.flow_id, flow.source_principal, flow.detail)
            app.reset()
            return
        dst = F.Flow(F.REPORTER_DESTINATION, flow.facts, security=F.SECURITY_MTLS)
        dst.set_source(source)
        dst.set_destination(destination)
        dst.set_service(dialled_service(ctx.registry(), flow.facts.service, destination))  # as the inbound side
        limits = ctx.limits.get(F.REPORTER_DESTINATION)
        counted = False
        upstream: PlainLeg | None = None
        opened = False
        try:
            problem = self._svid_problem("destination", destination)
            if problem:  # cross-node the destination node could not serve its identity
                self._refuse(app, flow, dst, Status.DENIED, F.FLAG_IDENTITY_ERROR, F.FLAG_DENY, problem)
                return
            if limits is not None:
                hit = limits.try_acquire(source.spiffe_id.uri)
                if hit is not None:
                    self._refuse(app, flow, dst, Status.OVERLOADED, F.FLAG_CONNECTION_LIMIT, F.FLAG_CONNECTION_LIMIT,
                                 limits.describe(hit, source.spiffe_id.uri))
                    return
                counted = True
            if not authorized(ctx.policy, dst, destination, source.spiffe_id):
                flow.policy = dst.policy
                self._refuse(app, flow, dst, Status.DENIED, F.FLAG_DENY, F.FLAG_DENY, dst.detail, dst.policy)
                return
            upstream = await self._connect(app, flow, dst, route)
            if upstream is None:
                return
            ctx.flow_opened(dst)
            opened = True
            await self._move(app, upstream, flow, dst)
        finally:
            if counted:
                limits.release(source.spiffe_id.uri)
            if upstream is not None and dst.response_flags != F.FLAG_NONE:
                upstream.reset()
            if opened or dst.response_flags != F.FLAG_NONE:
                ctx.flow_closed(dst)

    def _svid_problem(self, role: str, workload: Workload) -> str:
        """Why the node holds no current SVID for ``workload`` ("" when it does): without one the tunnel
        could not be made (the source's to present, the destination's to serve)."""
        try:
            svid = self._ctx.identities.svid(workload.spiffe_id)
        except IdentityError as exc:
            return f"same-node {role} {workload.key}: {exc}"
        if svid.not_after.timestamp() <= time.time():
            return (f"same-node {role} {workload.key}: its SVID expired at {svid.not_after.isoformat()} "
                    "(the node's identity rotation is behind; see `tcpmesh doctor`)")
        return ""

    async def _connect(self, app: PlainLeg, flow: F.Flow, dst: F.Flow, route: OutboundRoute) -> PlainLeg | None:
        ctx = self._ctx
        source, destination = route.source, route.destination
        source_ip = None
        mark = ctx.source_mark_for(flow.destination_ip)
        if mark:  # the client pod's own address, as the inbound proxy dials cross-node
            try:
                source_ip = source_for(flow.source_ip, source, source.spiffe_id, flow.destination_ip)
            except SourceRefused as exc:  # cannot happen for a registry source; fail closed anyway
                self._refuse(app, flow, dst, Status.DENIED, F.FLAG_IDENTITY_ERROR, F.FLAG_DENY, str(exc))
                return None
        try:
            async with asyncio.timeout(ctx.connect_timeout):
                return await connect(ctx.loop, _paused_leg, flow.destination_ip, flow.destination_port,
                                     source_ip, mark)
        except TimeoutError:
            self._refuse(app, flow, dst, Status.TIMEOUT, F.FLAG_UPSTREAM_TIMEOUT, F.FLAG_UPSTREAM_TIMEOUT,
                         f"timed out connecting to {destination.key}")
        except OSError as exc:
            status = Status.UNREACHABLE if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                         errno.ENETUNREACH) else Status.INTERNAL
            self._refuse(app, flow, dst, status, F.FLAG_UPSTREAM_FAILURE, F.FLAG_UPSTREAM_FAILURE,
                         f"connect to {destination.key} port {flow.destination_port}: {exc.strerror or exc}")
        return None

    async def _move(self, app: PlainLeg, upstream: PlainLeg, flow: F.Flow, dst: F.Flow) -> None:
        """Both records run and end with the one mover; live telemetry and the idle sweep see both."""
        ctx = self._ctx
        mover = Relay(app, upstream)
        view = _DestinationView(mover)
        ctx.relays[mover] = flow
        ctx.relays[view] = dst
        ctx.metrics.handshake(flow)
        ctx.metrics.handshake(dst)
        if ctx.tcp_stats is not None:  # the app leg of each record; no tunnel leg
            ctx.tcp_stats.flow_started(flow, app, NO_LEG)
            ctx.tcp_stats.flow_started(dst, NO_LEG, upstream)
        try:
            await mover.start()
        finally:
            ctx.end_relay(mover, flow)
            ctx.end_relay(view, dst)

    @staticmethod
    def _refuse(app: PlainLeg, flow: F.Flow, dst: F.Flow, status: Status, dst_flag: str, src_flag: str,
                reason: str, policy: str = "") -> None:
        """What a refusal records cross-node: the destination record the inbound proxy's flag and STATUS
        text, the source record the flag and detail the outbound proxy derives from that STATUS."""
        reply = StatusReply(status, reason, policy)
        dst.fail(dst_flag, reply.text)
        flow.fail(src_flag, f"destination node answered {status.name}: {reply.text}")
        flow.policy = policy or flow.policy
        log.warning("flow %s from %s to %s:%d failed: %s", flow.flow_id, flow.source_principal,
                    flow.destination_ip, flow.destination_port, flow.detail)
        app.reset()
