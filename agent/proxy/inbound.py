"""The inbound proxy: terminates tunnels from other nodes' outbound proxies and connects to the pod.

Per connection: TLS 1.3 handshake with the destination identity's SVID (picked by SNI) and a
required client certificate; read the client's SPIFFE ID; read CONNECT; check that it names a
workload of this node under the requested identity; connect to it; answer STATUS; relay.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl

from agent.identity.errors import PeerIdentityError
from agent.identity.errors import PeerProtocolError as AlpnMismatch
from agent.identity.tls import check_alpn, describe_tls_error
from agent.proxy import flow as F
from agent.proxy.endpoints import PlainLeg, TlsLeg
from agent.proxy.handshake import read_header
from agent.identity.spiffe import SpiffeId
from agent.policy.engine import Request
from agent.proxy.header import KIND_CONNECT, ConnectRequest, PeerProtocolError, Status, StatusReply, encode_status
from agent.proxy.relay import Relay
from agent.proxy.routing import route_inbound
from agent.proxy.server import ProxyContext
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.inbound")
DENIED_POLICY_PREFIX = "policy "  # a DENIED reason starts "policy <namespace>/<name>: " (docs/protocol.md)


class InboundProxy:
    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx

    def protocol_factory(self) -> TlsLeg:
        leg = TlsLeg(self._ctx.identities.server_context, server_side=True)
        self._ctx.spawn(self._serve(leg))
        return leg

    async def _serve(self, tunnel: TlsLeg) -> None:
        flow = F.Flow(F.REPORTER_DESTINATION, security=F.SECURITY_MTLS)
        upstream: PlainLeg | None = None
        opened = False
        try:
            request = await self._accept_tunnel(tunnel, flow)
            if request is None:
                return
            upstream = await self._connect_workload(tunnel, flow)
            if upstream is None:
                return
            self._ctx.flow_opened(flow)
            opened = True
            tunnel.write(encode_status(StatusReply(Status.OK)))
            await self._ctx.relay(Relay(tunnel, upstream), flow, a_leftover=request)
        finally:
            if flow.response_flags != F.FLAG_NONE:
                tunnel.close()  # flushes a STATUS refusal before closing
                if upstream is not None:
                    upstream.reset()
            if opened or flow.response_flags != F.FLAG_NONE:
                self._ctx.flow_closed(flow)

    async def _accept_tunnel(self, tunnel: TlsLeg, flow: F.Flow) -> bytes | None:
        """Handshake, identify the peer, read CONNECT; returns payload bytes that followed it."""
        timeout = self._ctx.connect_timeout
        peer = tunnel.peername() or ("", 0)
        flow.source_ip, flow.source_port = peer[0], peer[1]  # known before the handshake: rejections name it
        try:
            await asyncio.wait_for(asyncio.shield(tunnel.handshake_done), timeout)
            assert tunnel.ssl_object is not None
            check_alpn(tunnel.ssl_object)
            peer_id = self._ctx.identities.peer_identity(tunnel.ssl_object)  # verified, of our trust domain
            flow.set_source(None, peer_id.uri)
            peer = tunnel.peername() or ("", 0)
            flow.source_ip, flow.source_port = peer[0], peer[1]
            request, rest = await read_header(tunnel, KIND_CONNECT, timeout)
        except asyncio.TimeoutError:
            flow.fail(F.FLAG_PROTOCOL_ERROR, "tunnel did not complete its handshake and header in time")
        except PeerIdentityError as exc:
            flow.fail(F.FLAG_IDENTITY_ERROR, str(exc))
        except AlpnMismatch as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, str(exc))
        except ssl.SSLError as exc:
            flow.fail(F.FLAG_TLS_FAILURE, f"TLS handshake failed: {describe_tls_error(exc)}")
        except PeerProtocolError as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, f"invalid tunnel header: {exc}")
            tunnel.write(encode_status(StatusReply(Status.BAD_REQUEST, str(exc))))
        except OSError as exc:
            flow.fail(F.FLAG_CONNECTION_TERMINATED, f"tunnel closed during setup: {exc}")
        else:
            flow.flow_id = request.flow_id.hex()  # type: ignore[union-attr]
            self._attribute_source(flow, request, peer_id)  # type: ignore[arg-type]
            flow.destination_ip, flow.destination_port = request.dest_ip, request.dest_port  # type: ignore[union-attr]
            return rest
        if not flow.source_ip:  # the tunnel task may start before its transport is connected
            peer = tunnel.peername() or ("", 0)
            flow.source_ip, flow.source_port = peer[0], peer[1]
        log.warning("inbound tunnel from %s rejected: %s", flow.source_ip or "?", flow.detail)
        return None

    def _attribute_source(self, flow: F.Flow, request: ConnectRequest, peer_id: SpiffeId) -> None:
        """Name the source workload from the address the client node reported — only if the registry
        says that workload holds the identity the client proved; the certificate stays authoritative."""
        if not request.source_ip:
            return
        flow.source_ip, flow.source_port = request.source_ip, request.source_port
        workload = self._ctx.registry().by_ip(request.source_ip)
        if workload is not None and workload.spiffe_id == peer_id:
            flow.set_source(workload)

    async def _connect_workload(self, tunnel: TlsLeg, flow: F.Flow) -> PlainLeg | None:
        assert tunnel.ssl_object is not None
        target = route_inbound(self._ctx.registry(), self._ctx.node_name, flow.destination_ip,
                               self._ctx.identities.served_identity(tunnel.ssl_object))
        if target.workload is None:
            self._refuse(tunnel, flow, Status.UNKNOWN_DESTINATION, F.FLAG_NO_ROUTE, target.reason)
            return None
        flow.set_destination(target.workload)
        if not self._authorized(flow, target.workload):
            self._refuse(tunnel, flow, Status.DENIED, F.FLAG_DENY, flow.detail)
            return None
        try:
            _, leg = await asyncio.wait_for(
                self._ctx.loop.create_connection(lambda: PlainLeg(start_paused=True),
                                                 flow.destination_ip, flow.destination_port),
                self._ctx.connect_timeout)
            return leg
        except asyncio.TimeoutError:
            self._refuse(tunnel, flow, Status.TIMEOUT, F.FLAG_UPSTREAM_TIMEOUT,
                         f"timed out connecting to {target.workload.key}")
        except OSError as exc:
            status = Status.UNREACHABLE if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                         errno.ENETUNREACH) else Status.INTERNAL
            self._refuse(tunnel, flow, status, F.FLAG_UPSTREAM_FAILURE,
                         f"connect to {target.workload.key} port {flow.destination_port}: {exc.strerror or exc}")
        return None

    def _authorized(self, flow: F.Flow, workload: Workload) -> bool:
        """Ask the policy engine; record the deciding policy (and any dry-run verdict) on the flow."""
        if self._ctx.policy is None:
            return True
        principal = flow.source_principal if flow.source_principal != F.UNKNOWN else None
        namespace = SpiffeId.parse(principal).namespace if principal else None
        decision = self._ctx.policy.decide(Request(principal, namespace, workload.name, workload.namespace,
                                                   flow.destination_port))
        flow.policy = decision.policy or ""
        flow.dry_run = decision.dry_run or ""
        if decision.dry_run:
            log.info("flow %s dry-run: would %s", flow.flow_id, decision.dry_run)
        if not decision.allowed:
            flow.detail = (f"{DENIED_POLICY_PREFIX}{decision.policy}: " if decision.policy else "") + decision.reason
        return decision.allowed

    @staticmethod
    def _refuse(tunnel: TlsLeg, flow: F.Flow, status: Status, flag: str, reason: str) -> None:
        flow.fail(flag, reason)
        tunnel.write(encode_status(StatusReply(status, reason)))
        tunnel.write_eof()
        log.info("inbound flow %s refused (%s): %s", flow.flow_id, status.name, reason)
