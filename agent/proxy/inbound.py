"""The inbound proxy: terminates tunnels from other nodes' outbound proxies and connects to pods.

Per tunnel: TLS 1.3 handshake with the destination identity's SVID (picked by SNI), a required
client certificate, ALPN tcpmesh/2; the client's SPIFFE ID is read once. Per stream of the tunnel:
read OPEN; check that it names a workload of this node under the identity the tunnel was opened for;
ask the policy; connect to the workload; answer STATUS; relay. One flow record per stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import ssl
import time

from agent.identity.errors import PeerIdentityError
from agent.identity.errors import PeerProtocolError as AlpnMismatch
from agent.identity.spiffe import SpiffeId
from agent.identity.peer import PeerCredential
from agent.identity.tls import check_alpn, describe_tls_error, peer_credential
from agent.connection import flow as F
from agent.connection.facts import ConnectionFacts
from agent.proxy import mux as M
from agent.proxy.authorize import authorized
from agent.proxy.deadlines import enforce_tunnel_deadlines, tune_tunnel_socket
from agent.proxy.endpoints import PlainLeg, TlsLeg
from agent.proxy.header import Status, StatusReply
from agent.proxy.relay import Relay
from agent.proxy.routing import dialled_service, route_inbound
from agent.proxy.server import ProxyContext
from agent.proxy.session import MuxSession, Stream
from agent.proxy.upstream import SourceRefused, connect, source_for
from agent.registry.model import Workload

log = logging.getLogger("tcpmesh.inbound")


def _paused_leg() -> PlainLeg:
    return PlainLeg(start_paused=True)


class InboundProxy:
    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx

    def protocol_factory(self) -> TlsLeg:
        return self._ctx.kernel_tls.leg(self._ctx.identities.server_context, server_side=True, admit=self._admit)

    def _admit(self, tunnel: TlsLeg) -> bool:
        """At accept: within the handshake caps (proxy.max_handshakes[_per_source]) the tunnel's task starts;
        beyond them the connection is reset at once — counted by the caps, no record, no task, no TLS state."""
        source = (tunnel.peername() or ("",))[0]
        gate = self._ctx.handshakes
        if gate is not None and gate.try_acquire(source) is not None:
            tunnel.reset()
            return False
        self._ctx.spawn(self._serve_tunnel(tunnel, source))
        return True

    async def _serve_tunnel(self, tunnel: TlsLeg, source: str) -> None:
        setup = F.Flow(F.REPORTER_DESTINATION, security=F.SECURITY_MTLS)  # recorded only if the tunnel fails
        started = time.monotonic()
        try:
            accepted = await self._accept_tunnel(tunnel, setup)
        finally:
            if self._ctx.handshakes is not None:
                self._ctx.handshakes.release(source)
        if accepted is None:
            tunnel.close()
            self._ctx.flow_closed(setup)
            return
        peer_id, credential = accepted
        served = self._ctx.identities.served_identity(tunnel.ssl_object)  # the local workloads' identity (SNI)
        session = MuxSession(
            tunnel, client=False, gate=self._ctx.buffer_gate, identity=served.uri if served else peer_id.uri,
            on_open=lambda stream, request: self._ctx.spawn(
                self._serve_stream(stream, request, peer_id, setup, credential)),
            on_bad_open=lambda stream, reason: self._bad_open(stream, reason, setup))
        session.start()
        self._ctx.kernel_tls.track(session)
        tune_tunnel_socket(tunnel.socket(), self._ctx.tunnel_timeout)
        expired = await enforce_tunnel_deadlines(
            session, self._ctx.handshake_timeout, self._ctx.inbound_idle_timeout, started,
            revoked=lambda: self._revoked(credential), grace=self._ctx.revoked_grace,
            on_revoked=lambda reason: self._going_away(session, setup, reason))
        if expired is not None:
            self._close_expired(session, setup, expired)
            return
        reason = await session.closed
        if reason.startswith("protocol error"):
            setup.fail(F.FLAG_PROTOCOL_ERROR, reason)
            self._ctx.flow_closed(setup)

    async def _accept_tunnel(self, tunnel: TlsLeg, flow: F.Flow) -> tuple[SpiffeId, PeerCredential] | None:
        """Handshake and identify the peer (and what its chain proved, for later checks); None (with the
        reason on ``flow``) when refused. The flow's facts are the tunnel's peer address (known before the
        handshake, or once the transport is up)."""
        peer = tunnel.peername() or ("", 0)
        try:
            await asyncio.wait_for(asyncio.shield(tunnel.handshake_done), self._ctx.handshake_timeout)
            assert tunnel.ssl_object is not None
            check_alpn(tunnel.ssl_object)
            peer_id = self._ctx.identities.peer_identity(tunnel.ssl_object)  # verified, of our trust domain
            credential = peer_credential(tunnel.ssl_object)
        except asyncio.TimeoutError:
            flow.fail(F.FLAG_HANDSHAKE_TIMEOUT, f"tunnel did not complete its TLS handshake within "
                                                f"{self._ctx.handshake_timeout:g}s (proxy.handshake_timeout_seconds)")
        except PeerIdentityError as exc:
            flow.fail(F.FLAG_IDENTITY_ERROR, str(exc))
        except AlpnMismatch as exc:
            flow.fail(F.FLAG_PROTOCOL_ERROR, str(exc))
        except ssl.SSLError as exc:
            flow.fail(F.FLAG_TLS_FAILURE, f"TLS handshake failed: {describe_tls_error(exc)}")
        except OSError as exc:
            flow.fail(F.FLAG_CONNECTION_TERMINATED, f"tunnel closed during setup: {exc}")
        else:
            flow.handshake_seconds = tunnel.handshake_seconds
            flow.set_source(None, peer_id.uri)
            flow.facts = self._peer_facts(tunnel, peer)
            return peer_id, credential
        flow.facts = self._peer_facts(tunnel, peer)
        log.warning("inbound tunnel from %s rejected: %s", flow.source_ip or "?", flow.detail)
        return None

    @staticmethod
    def _peer_facts(tunnel: TlsLeg, peer: tuple) -> ConnectionFacts:
        if not peer[0]:  # the tunnel task may start before its transport is connected
            peer = tunnel.peername() or ("", 0)
        return ConnectionFacts(source_ip=peer[0], source_port=peer[1])

    async def _serve_stream(self, stream: Stream, request: ConnectionFacts, peer_id: SpiffeId, setup: F.Flow,
                            credential: PeerCredential) -> None:
        flow = F.Flow(F.REPORTER_DESTINATION, security=F.SECURITY_MTLS)
        flow.set_source(None, peer_id.uri)
        if setup.handshake_seconds is not None:  # the first stream of a tunnel reports its handshake
            flow.handshake_seconds, setup.handshake_seconds = setup.handshake_seconds, None
        flow.facts = self._attribute_source(flow, request, peer_id, setup.facts)
        upstream: PlainLeg | None = None
        opened = False
        limits = self._ctx.limits.get(F.REPORTER_DESTINATION)
        counted = False
        try:
            revoked = self._revoked(credential)
            if revoked is not None:  # TLS checked the chain once, at the handshake: every OPEN checks it again
                self._refuse(stream, flow, Status.DENIED, F.FLAG_IDENTITY_ERROR, revoked)
                stream.reset(revoked)  # after its STATUS: a refused stream must not keep the tunnel alive
                self._going_away(stream.session, setup, revoked)
                return
            if limits is not None:
                hit = limits.try_acquire(peer_id.uri)
                if hit is not None:
                    self._refuse(stream, flow, Status.OVERLOADED, F.FLAG_CONNECTION_LIMIT,
                                 limits.describe(hit, peer_id.uri))
                    return
                counted = True
            upstream = await self._connect_workload(stream, flow, peer_id, request.source_ip)
            if upstream is None:
                return
            self._ctx.flow_opened(flow)
            opened = True
            stream.session.send_status(stream, StatusReply(Status.OK))
            relay = Relay(stream, upstream)
            try:
                await self._ctx.start_relay(relay, flow)
            finally:
                self._ctx.end_relay(relay, flow)
        finally:
            if counted:
                limits.release(peer_id.uri)
            if flow.response_flags != F.FLAG_NONE and upstream is not None:
                upstream.reset()
            if opened or flow.response_flags != F.FLAG_NONE:
                self._ctx.flow_closed(flow)

    def _revoked(self, credential: PeerCredential) -> str | None:
        """Why the tunnel's credential no longer holds (expired chain, root gone from the bundle), or None."""
        return credential.problem(time.time(), self._ctx.identities.trust_anchors)

    def _going_away(self, session: MuxSession, setup: F.Flow, reason: str) -> None:
        """Once per tunnel: tell the client (GOAWAY: no new streams here) and the operator. The tunnel
        closes when its last stream ends, or after proxy.revoked_tunnel_grace_seconds."""
        if session.goaway_sent:
            return
        session.goaway_sent = True
        session.send(M.encode(M.FrameType.GOAWAY, 0, reason.encode()[:M.MAX_CONTROL_PAYLOAD]))
        log.warning("inbound tunnel from %s (%s) takes no new streams: %s; it closes when its %d stream(s) end, "
                    "at the latest in %gs (proxy.revoked_tunnel_grace_seconds)", setup.source_ip or "?",
                    setup.source_principal, reason, len(session.streams), self._ctx.revoked_grace)

    def _close_expired(self, session: MuxSession, setup: F.Flow, expired: str) -> None:
        """A deadline of agent.proxy.deadlines ended the tunnel: GOAWAY, close; a missing OPEN is recorded."""
        if expired == "open":
            reason = (f"no complete OPEN within {self._ctx.handshake_timeout:g}s of the connection "
                      "(proxy.handshake_timeout_seconds)")
            setup.fail(F.FLAG_OPEN_TIMEOUT, reason)
            log.warning("inbound tunnel from %s (%s) closed: %s", setup.source_ip or "?", setup.source_principal,
                        reason)
        elif expired == "revoked":
            reason = "its credential no longer holds and its last stream ended"
        elif expired == "revoked_grace":
            reason = (f"its credential no longer holds and proxy.revoked_tunnel_grace_seconds "
                      f"({self._ctx.revoked_grace:g}s) ran out: open streams are reset")
            log.warning("inbound tunnel from %s (%s) closed: %s", setup.source_ip or "?", setup.source_principal,
                        reason)
        else:
            reason = f"idle for {self._ctx.inbound_idle_timeout:g}s (proxy.inbound_tunnel_idle_seconds)"
        session.send(M.encode(M.FrameType.GOAWAY, 0, reason.encode()[:M.MAX_CONTROL_PAYLOAD]))
        session.close(reason)
        if expired == "open":
            self._ctx.flow_closed(setup)

    def _bad_open(self, stream: Stream, reason: str, setup: F.Flow) -> None:
        flow = F.Flow(F.REPORTER_DESTINATION, setup.facts, security=F.SECURITY_MTLS,
                      source_principal=setup.source_principal)
        self._refuse(stream, flow, Status.BAD_REQUEST, F.FLAG_PROTOCOL_ERROR, f"invalid OPEN: {reason}")
        self._ctx.flow_closed(flow)

    def _attribute_source(self, flow: F.Flow, request: ConnectionFacts, peer_id: SpiffeId,
                          tunnel: ConnectionFacts) -> ConnectionFacts:
        """The facts this node records: the client node's, as sent — if the registry says the workload at
        the reported source address holds the identity the client proved (then it names the source
        workload; the certificate stays authoritative). Otherwise the client process is not taken, and
        without a reported source address the tunnel's peer address stands in."""
        if request.source_ip:
            workload = self._ctx.registry().by_ip(request.source_ip)
            if workload is not None and workload.spiffe_id == peer_id:
                flow.set_source(workload)
                return request  # as the source node saw it
        return dataclasses.replace(request, source_ip=request.source_ip or tunnel.source_ip,
                                   source_port=request.source_port if request.source_ip else tunnel.source_port,
                                   process=None)

    async def _connect_workload(self, stream: Stream, flow: F.Flow, peer_id: SpiffeId,
                                claimed_ip: str) -> PlainLeg | None:
        """``claimed_ip``: the source address the client node reported in the OPEN (may be empty)."""
        tunnel = stream.session.tls
        assert tunnel.ssl_object is not None
        target = route_inbound(self._ctx.registry(), self._ctx.node_name, flow.destination_ip,
                               self._ctx.identities.served_identity(tunnel.ssl_object))
        if target.workload is None:
            self._refuse(stream, flow, Status.UNKNOWN_DESTINATION, F.FLAG_NO_ROUTE, target.reason)
            return None
        flow.set_destination(target.workload)
        flow.set_service(dialled_service(self._ctx.registry(), flow.facts.service, target.workload))
        if not self._authorized(flow, target.workload, peer_id):
            self._refuse(stream, flow, Status.DENIED, F.FLAG_DENY, flow.detail, flow.policy)
            return None
        source_ip = None
        mark = self._ctx.source_mark_for(flow.destination_ip)
        if mark:  # the client pod's own address, if the registry binds it to the proven identity
            try:
                claimed = self._ctx.registry().by_ip(claimed_ip) if claimed_ip else None
                source_ip = source_for(claimed_ip, claimed, peer_id, flow.destination_ip)
            except SourceRefused as exc:
                self._refuse(stream, flow, Status.DENIED, F.FLAG_IDENTITY_ERROR, str(exc))
                log.warning("inbound flow %s from %s refused: %s", flow.flow_id,
                            (stream.session.tls.peername() or ("?",))[0], exc)
                return None
        try:
            async with asyncio.timeout(self._ctx.connect_timeout):  # no extra task, unlike wait_for
                return await connect(self._ctx.loop, _paused_leg, flow.destination_ip, flow.destination_port,
                                     source_ip, mark)
        except TimeoutError:
            self._refuse(stream, flow, Status.TIMEOUT, F.FLAG_UPSTREAM_TIMEOUT,
                         f"timed out connecting to {target.workload.key}")
        except OSError as exc:
            status = Status.UNREACHABLE if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                         errno.ENETUNREACH) else Status.INTERNAL
            self._refuse(stream, flow, status, F.FLAG_UPSTREAM_FAILURE,
                         f"connect to {target.workload.key} port {flow.destination_port}: {exc.strerror or exc}")
        return None

    def _authorized(self, flow: F.Flow, workload: Workload, peer_id: SpiffeId) -> bool:
        """The policy's answer for the tunnel's proven identity ``peer_id`` (agent.proxy.authorize)."""
        return authorized(self._ctx.policy, flow, workload, peer_id)

    @staticmethod
    def _refuse(stream: Stream, flow: F.Flow, status: Status, flag: str, reason: str, policy: str = "") -> None:
        """Answer the stream's OPEN with a refusal (before any payload) and end our side of it; a DENIED
        names the deciding ``policy`` in its own field."""
        reply = StatusReply(status, reason, policy)
        flow.fail(flag, reply.text)
        stream.session.send_status(stream, reply)
        stream.write_eof()
        log.info("inbound flow %s refused (%s): %s", flow.flow_id, status.name, reply.text)
