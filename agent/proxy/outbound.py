"""The outbound proxy: accepts connections the capture steered here, tunnels them with mTLS.

Per connection: recover the original destination and the client process (from the capture),
route it (agent.proxy.routing), dial the destination node's inbound proxy with the source
workload's SVID, check the server's SPIFFE ID (secure naming), send CONNECT, wait for STATUS,
then relay. Destinations outside the mesh pass through in plaintext. Every outcome is recorded
on the flow, counted, and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Callable

from agent.identity.errors import PeerIdentityError
from agent.identity.errors import PeerProtocolError as AlpnMismatch
from agent.identity.tls import check_alpn, check_peer, describe_tls_error
from agent.proxy import flow as F
from agent.proxy.endpoints import Leg, PlainLeg, TlsLeg
from agent.proxy.handshake import read_header
from agent.proxy.header import KIND_STATUS, ConnectRequest, PeerProtocolError, Status, encode_connect
from agent.proxy.relay import Relay
from agent.proxy.routing import OutboundRoute, RouteKind, route_outbound
from agent.proxy.server import ProxyContext

log = logging.getLogger("tcpmesh.outbound")

STATUS_FLAGS = {
    Status.DENIED: F.FLAG_DENY,
    Status.UNREACHABLE: F.FLAG_UPSTREAM_FAILURE,
    Status.TIMEOUT: F.FLAG_UPSTREAM_TIMEOUT,
    Status.UNKNOWN_DESTINATION: F.FLAG_NO_ROUTE,
    Status.BAD_REQUEST: F.FLAG_PROTOCOL_ERROR,
    Status.INTERNAL: F.FLAG_UPSTREAM_FAILURE,
}


def _policy_named_in(reason: str) -> str:
    """The ``namespace/name`` a DENIED reason starts with ("policy <ns>/<name>: ..."), or ""."""
    if not reason.startswith("policy "):
        return ""
    return reason[len("policy "):].split(":", 1)[0]


class OutboundProxy:
    def __init__(self, ctx: ProxyContext, origin_reader: Callable[[socket.socket], object | None]) -> None:
        self._ctx = ctx
        self._read_origin = origin_reader

    def protocol_factory(self) -> PlainLeg:
        leg = PlainLeg(start_paused=True)
        leg.connected.add_done_callback(lambda _: self._ctx.spawn(self._serve(leg)))
        return leg

    async def _serve(self, app: PlainLeg) -> None:
        flow = F.Flow(F.REPORTER_SOURCE, flow_id=F.new_flow_id().hex())
        upstream: Leg | None = None
        try:
            route = self._route(app, flow)
            if route.kind is RouteKind.PASSTHROUGH and not self._ctx.passthrough_allowed:
                route = OutboundRoute(RouteKind.REJECT, route.source, flag=F.FLAG_DENY,
                                      reason=f"{flow.destination_ip}:{flow.destination_port} is outside the mesh "
                                             "and policy.outbound_passthrough is DENY")
            if route.kind is RouteKind.REJECT:
                flow.fail(route.flag, route.reason)
                log.warning("refusing captured connection: %s", route.reason)
                app.reset()
                return
            flow.security = F.SECURITY_MTLS if route.kind is RouteKind.MESH else F.SECURITY_NONE
            self._ctx.flow_opened(flow)
            if route.kind is RouteKind.PASSTHROUGH:
                dialed = await self._dial_plain(flow)
            else:
                dialed = await self._dial_tunnel(route, flow)
            if dialed is None:
                app.reset()
                return
            upstream, leftover = dialed
            await self._ctx.relay(Relay(app, upstream), flow, b_leftover=leftover)
        finally:
            if upstream is not None and flow.response_flags != F.FLAG_NONE:
                upstream.reset()
            self._ctx.flow_closed(flow)

    def _route(self, app: PlainLeg, flow: F.Flow) -> OutboundRoute:
        peer = app.peername() or ("", 0)
        flow.source_ip, flow.source_port = peer[0], peer[1]
        sock = app.socket()
        origin = self._read_origin(sock) if sock is not None else None
        if origin is None:
            return OutboundRoute(RouteKind.REJECT, None, flag=F.FLAG_NO_ROUTE,
                                 reason=f"connection from {peer[0]}:{peer[1]} has no original destination "
                                        "(it was not captured by tcpmesh; do not connect to the outbound port directly)")
        flow.destination_ip, flow.destination_port = origin.dst_ip, origin.dst_port
        flow.pid, flow.comm, flow.uid, flow.cgroup_id = origin.pid, origin.comm, origin.uid, origin.cgroup_id
        route = route_outbound(self._ctx.registry(), self._ctx.node_name, peer[0], origin.dst_ip, origin.dst_port,
                               self._ctx.inbound_port)
        flow.set_source(route.source)
        flow.set_destination(route.destination)
        return route

    async def _dial_plain(self, flow: F.Flow) -> tuple[PlainLeg, bytes] | None:
        try:
            _, leg = await asyncio.wait_for(
                self._ctx.loop.create_connection(lambda: PlainLeg(start_paused=True),
                                                 flow.destination_ip, flow.destination_port),
                self._ctx.connect_timeout)
            return leg, b""
        except asyncio.TimeoutError:
            flow.fail(F.FLAG_UPSTREAM_TIMEOUT, "timed out connecting to a destination outside the mesh")
        except OSError as exc:
            flow.fail(F.FLAG_UPSTREAM_FAILURE, f"passthrough connect failed: {exc.strerror or exc}")
        return None

    async def _dial_tunnel(self, route: OutboundRoute, flow: F.Flow) -> tuple[TlsLeg, bytes] | None:
        """The tunnel leg after a STATUS OK, with any payload bytes that followed the reply."""
        assert route.source is not None and route.destination is not None and route.tunnel_address
        expected = route.destination.spiffe_id
        context = self._ctx.identities.client_context_for(route.source.spiffe_id)
        host, port = route.tunnel_address
        leg: TlsLeg | None = None
        try:
            _, leg = await asyncio.wait_for(
                self._ctx.loop.create_connection(lambda: TlsLeg(context, False, expected.sni), host, port),
                self._ctx.connect_timeout)
            await asyncio.wait_for(leg.handshake_done, self._ctx.connect_timeout)
            assert leg.ssl_object is not None
            check_alpn(leg.ssl_object)
            check_peer(leg.ssl_object, expected)
            leg.write(encode_connect(ConnectRequest(flow.destination_ip, flow.destination_port,
                                                    bytes.fromhex(flow.flow_id), flow.source_ip, flow.source_port)))
            reply, rest = await read_header(leg, KIND_STATUS, self._ctx.connect_timeout)
        except asyncio.TimeoutError:
            flow.fail(F.FLAG_UPSTREAM_TIMEOUT, f"timed out setting up the tunnel to {host}:{port}")
        except PeerIdentityError as exc:
            flow.fail(F.FLAG_IDENTITY_ERROR, str(exc))
        except AlpnMismatch as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, str(exc))
        except ssl.SSLError as exc:
            flow.fail(F.FLAG_TLS_FAILURE, f"TLS with {host}:{port} failed: {describe_tls_error(exc)}")
        except PeerProtocolError as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, f"{host}:{port} answered with an invalid header: {exc}")
        except OSError as exc:
            flow.fail(F.FLAG_UPSTREAM_FAILURE, f"cannot reach the inbound proxy at {host}:{port}: "
                                               f"{exc.strerror or exc} (is the agent on node {route.destination.node} "
                                               f"running, and is port {port} open between nodes?)")
        else:
            if reply.status is Status.OK:  # type: ignore[union-attr]
                return leg, rest
            flow.fail(STATUS_FLAGS.get(reply.status, F.FLAG_UPSTREAM_FAILURE),  # type: ignore[union-attr]
                      f"destination node answered {reply.status.name}: {reply.reason}")  # type: ignore[union-attr]
            if reply.status is Status.DENIED:  # type: ignore[union-attr]
                flow.policy = _policy_named_in(reply.reason)  # type: ignore[union-attr]
        if flow.response_flags != F.FLAG_NONE:
            log.warning("flow %s from %s to %s:%d failed: %s", flow.flow_id, flow.source_principal,
                        flow.destination_ip, flow.destination_port, flow.detail)
        if leg is not None:
            leg.reset()
        return None
