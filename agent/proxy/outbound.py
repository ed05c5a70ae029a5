"""The outbound proxy: accepts connections the capture steered here, tunnels them with mTLS.

Per connection: recover the original destination and the client process (from the capture),
route it (agent.proxy.routing), take a tcpmesh/2 tunnel to the destination node from the pool —
dialled with the source workload's SVID and checked against the destination's SPIFFE ID (secure
naming) when it was opened — open a stream on it, wait for STATUS, then relay. The outbound proxy
never dials a destination outside the mesh: the capture does not send it such connections (they
leave from the pod itself), and one that arrives anyway is refused. Every outcome is recorded on
the flow, counted, and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Callable

from agent.identity.errors import PeerIdentityError, UnknownIdentityError
from agent.identity.errors import PeerProtocolError as AlpnMismatch
from agent.proxy.balancer import RoundRobin
from agent.identity.tls import check_alpn, check_peer, describe_tls_error, peer_not_after
from agent.connection import flow as F
from agent.connection.facts import ClientProcess, ConnectionFacts
from agent.proxy.deadlines import tune_tunnel_socket
from agent.proxy.endpoints import Leg, PlainLeg
from agent.proxy.header import PeerProtocolError, Status
from agent.proxy.local import SameNodePath
from agent.proxy.origin_check import CgroupOwnership
from agent.proxy.pool import PoolKey, TunnelPool
from agent.proxy.relay import Relay
from agent.proxy.session import MuxSession, Stream
from agent.proxy.routing import OutboundRoute, RouteKind, route_outbound, route_without_origin
from agent.proxy.server import ProxyContext
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.outbound")
SERVER_CERT_MARGIN_SECONDS = 5.0  # stop opening streams on a tunnel this long before its server cert expires

STATUS_FLAGS = {
    Status.DENIED: F.FLAG_DENY,
    Status.UNREACHABLE: F.FLAG_UPSTREAM_FAILURE,
    Status.TIMEOUT: F.FLAG_UPSTREAM_TIMEOUT,
    Status.UNKNOWN_DESTINATION: F.FLAG_NO_ROUTE,
    Status.BAD_REQUEST: F.FLAG_PROTOCOL_ERROR,
    Status.INTERNAL: F.FLAG_UPSTREAM_FAILURE,
    Status.OVERLOADED: F.FLAG_CONNECTION_LIMIT,
}


class OutboundProxy:
    def __init__(self, ctx: ProxyContext, origin_reader: Callable[[socket.socket], object | None],
                 tunnel_idle_seconds: float = 60.0, same_node: SameNodePath | None = None) -> None:
        self._ctx = ctx
        self._same_node = same_node  # None (proxy.same_node: tunnel): same-node pairs take the tunnel too
        self._read_origin = origin_reader
        self.pool = TunnelPool(self.dial_session, idle_seconds=tunnel_idle_seconds)
        self._accepted = self._on_accepted  # one bound method shared by every accepted leg
        self._balancer = RoundRobin()  # which ready endpoint of a dialled Service (agent.proxy.balancer)
        self._owners = CgroupOwnership()  # the client's cgroup against its address's pod (agent.proxy.origin_check)

    def protocol_factory(self) -> PlainLeg:
        return PlainLeg(start_paused=True, on_connected=self._accepted)

    def _on_accepted(self, app: PlainLeg) -> None:
        self._ctx.spawn(self._serve(app))

    async def _serve(self, app: PlainLeg) -> None:
        flow = F.Flow(F.REPORTER_SOURCE)
        upstream: Leg | None = None
        counted = None  # (limits, identity) while this connection counts against agent.proxy.limits
        try:
            route = self._route(app, flow, F.new_flow_id())
            if route.kind is RouteKind.REJECT:
                flow.fail(route.flag, route.reason)
                log.warning("refusing captured connection: %s", route.reason)
                app.reset()
                return
            flow.security = F.SECURITY_MTLS
            limits = self._ctx.limits.get(F.REPORTER_SOURCE)
            if limits is not None:
                hit = limits.try_acquire(flow.source_principal)
                if hit is not None:
                    flow.fail(F.FLAG_CONNECTION_LIMIT, limits.describe(hit, flow.source_principal))
                    app.reset()
                    return
                counted = (limits, flow.source_principal)
            if self._same_node is not None and self._same_node.applies(route):
                await self._same_node.serve(app, route, flow)  # agent.proxy.local: no tunnel to ourselves
                return
            self._ctx.flow_opened(flow)
            dialed = await self._open_stream(route, flow)
            if dialed is None:
                app.reset()
                return
            upstream, leftover = dialed
            relay = Relay(app, upstream)
            try:
                await self._ctx.start_relay(relay, flow, b_leftover=leftover)
            finally:
                self._ctx.end_relay(relay, flow)
        finally:
            if counted is not None:
                counted[0].release(counted[1])
            if upstream is not None and flow.response_flags != F.FLAG_NONE:
                upstream.reset()
            self._ctx.flow_closed(flow)

    def _route(self, app: PlainLeg, flow: F.Flow, flow_id: bytes) -> OutboundRoute:
        """The connection's facts, from the capture's origin record and the accepted socket (built once,
        here, and carried unchanged to the other node), then where it goes."""
        peer = app.peername() or ("", 0)
        sock = app.socket()
        origin = None
        try:
            origin = self._read_origin(sock) if sock is not None else None
        finally:
            if origin is None:  # the flow record still names the client
                flow.facts = ConnectionFacts(flow_id=flow_id, source_ip=peer[0], source_port=peer[1])
        if origin is None:
            return route_without_origin(self._ctx.registry(), self._ctx.node_name, peer, _sockname(sock))
        process = None if origin.pid is None else ClientProcess(origin.pid, origin.uid, origin.comm)  # None: tc, iptables
        registry = self._ctx.registry()
        route = route_outbound(registry, self._ctx.node_name, peer[0], origin.dst_ip, origin.dst_port,
                               self._ctx.inbound_port, self._balancer)
        if route.source is not None and route.source.node == self._ctx.node_name:  # did that pod's cgroup connect?
            stolen = self._owners.problem(route.source, origin.cgroup_id,
                                          lambda: registry.local(self._ctx.node_name))
            if stolen:
                route = OutboundRoute(RouteKind.REJECT, None, flag=F.FLAG_IDENTITY_ERROR, reason=stolen)
        dst_ip, dst_port = origin.dst_ip, origin.dst_port
        if route.service is not None:  # a Service address: the stream goes to the chosen endpoint's target port
            flow.set_service(route.service)
            if route.destination is not None:
                dst_ip, dst_port = route.destination.ip, route.target_port
        elif route.host_port and route.destination is not None:  # a hostPort: the pod itself, its container port
            dst_ip, dst_port = route.destination.ip, route.target_port
        flow.facts = ConnectionFacts(dst_ip, dst_port, flow_id, _source_ip(peer[0], route.source, dst_ip), peer[1],
                                     process, origin.cgroup_id, route.service.key if route.service is not None else "")
        flow.set_source(route.source)
        flow.set_destination(route.destination)
        return route

    async def _open_stream(self, route: OutboundRoute, flow: F.Flow) -> tuple[Stream, bytes] | None:
        """A stream to the destination after its STATUS OK, on a pooled tunnel; None (reason on the flow) if refused."""
        assert route.source is not None and route.destination is not None and route.tunnel_address
        host, port = route.tunnel_address
        try:
            context = self._ctx.identities.client_context_for(route.source.spiffe_id)
        except UnknownIdentityError as exc:  # identity.mode issuer: its first SVID has not arrived yet
            flow.fail(F.FLAG_NO_IDENTITY, f"no SVID for {route.source.spiffe_id.uri} on this node yet: {exc}")
            log.warning("flow %s from %s refused: %s", flow.flow_id, flow.source_principal, flow.detail)
            return None
        # the context is part of the key: after a certificate rotation new streams take new tunnels
        key = PoolKey(route.source.spiffe_id, route.tunnel_address, route.destination.spiffe_id, id(context))
        stream: Stream | None = None
        try:
            session = await self.pool.session(key)
            if not session.handshake_reported:  # the first flow on a tunnel reports its handshake
                session.handshake_reported = True
                flow.handshake_seconds = session.tls.handshake_seconds
            stream, reply = await session.open(flow.facts, self._ctx.connect_timeout)
        except asyncio.TimeoutError:
            flow.fail(F.FLAG_UPSTREAM_TIMEOUT, f"timed out setting up the tunnel to {host}:{port}")
        except PeerIdentityError as exc:
            flow.fail(F.FLAG_IDENTITY_ERROR, str(exc))
        except AlpnMismatch as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, str(exc))
        except ssl.SSLError as exc:
            flow.fail(F.FLAG_TLS_FAILURE, f"TLS with {host}:{port} failed: {describe_tls_error(exc)}")
        except PeerProtocolError as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, f"{host}:{port} answered with an invalid STATUS: {exc}")
        except OSError as exc:
            flow.fail(F.FLAG_UPSTREAM_FAILURE, f"cannot reach the inbound proxy at {host}:{port}: "
                                               f"{exc.strerror or exc} (is the agent on node {route.destination.node} "
                                               f"running, and is port {port} open between nodes?)")
        else:
            if reply.status is Status.OK:
                return stream, b""
            flow.fail(STATUS_FLAGS.get(reply.status, F.FLAG_UPSTREAM_FAILURE),
                      f"destination node answered {reply.status.name}: {reply.text}")
            flow.policy = reply.policy
        log.warning("flow %s from %s to %s:%d failed: %s", flow.flow_id, flow.source_principal,
                    flow.destination_ip, flow.destination_port, flow.detail)
        if stream is not None:
            stream.reset("refused")
        return None

    async def dial_session(self, key: PoolKey) -> MuxSession:
        """A new tunnel for ``key``: TLS 1.3 with the source's SVID, ALPN and the server's identity checked."""
        host, port = key.address
        context = self._ctx.identities.client_context_for(key.source)
        _, leg = await asyncio.wait_for(
            self._ctx.loop.create_connection(lambda: self._ctx.kernel_tls.leg(context, False, key.destination.sni), host, port),
            self._ctx.connect_timeout)
        try:
            await asyncio.wait_for(asyncio.shield(leg.handshake_done), self._ctx.connect_timeout)
            assert leg.ssl_object is not None
            check_alpn(leg.ssl_object)
            check_peer(leg.ssl_object, key.destination)
            valid_until = peer_not_after(leg.ssl_object)
        except BaseException:
            leg.reset()
            raise
        tune_tunnel_socket(leg.socket(), self._ctx.tunnel_timeout)
        session = MuxSession(leg, client=True, gate=self._ctx.buffer_gate, identity=key.source.uri)
        remaining = valid_until - time.time()
        session.peer_valid_until = valid_until - min(SERVER_CERT_MARGIN_SECONDS, max(remaining, 0) / 4)
        session.start()
        self._ctx.kernel_tls.track(session)
        return session


def _source_ip(peer_ip: str, source: Workload | None, dst_ip: str) -> str:
    """The client's address the facts name: the accepted socket's peer — but an IPv6 client socket reaches
    this proxy over IPv4 (connect6 sends it to ::ffff:REDIR_IP), so for an IPv6 destination it is the
    pod's IPv6 address, the one its IPv6 server sees (docs/capture-source-address.md) and records show."""
    if source is not None and source.ip6 and ":" in dst_ip and peer_ip in (source.ip, f"::ffff:{source.ip}"):
        return source.ip6
    return peer_ip


def _sockname(sock: socket.socket | None) -> tuple[str, int]:
    """The accepted socket's own address (the outbound port as the client dialled it); ("", 0) if gone."""
    try:
        return tuple(sock.getsockname()[:2]) if sock is not None else ("", 0)  # type: ignore[return-value]
    except OSError:
        return ("", 0)
