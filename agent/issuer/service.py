"""One request → one answer: the issuer's checks in order, every refusal logged with its reason and counted.

``IssuerService.handle(request, peer)`` is everything the issuer decides; ``server.py`` only adds TLS
and lines. ``peer`` is what the TLS layer proved: the source address and, if the client presented a
certificate that verified against the trust bundle, the node it names (``spiffe://<td>/node/<name>``;
any other certificate counts as none). Any op: a client certificate naming a node must be signed by an issuer CA
under a current root, or by a current root — by signature, ``signing.IssuingCa`` (``untrusted_node_credential``
otherwise: a legacy node intermediate can sign a leaf naming any node; a removed root outlives its bundle in TLS).
Order for ``sign``: credential → rate limit (per node, cost =
CSRs asked) → per identity: placement (``placement.authorize``), then the CSR. For ``node``: a
credential of that very node, or a bootstrap token (rate-limited per source address *before* the
token is looked at, so guessing is slow) → the CSR → the token is claimed last, so a bad CSR does not
burn it; or a Kubernetes service-account token (same rate limit, then ``kubernetes_attestation``:
TokenReview, the bound pod, whose node must be the node asked for). With attestation ``exclusive`` a
node credential cannot renew itself: every node SVID is attested afresh. Clock injected; the CA
signs in-process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from agent.identity.errors import IdentityError
from agent.identity.spiffe import SpiffeIdError, parse_node_id, validate_node_name
from agent.issuer import protocol
from agent.issuer.kubernetes_attestation import AttestationRefused
from agent.issuer.placement import authorize
from agent.issuer.protocol import ProtocolError, field, refusal, success
from agent.issuer.ratelimit import RateLimiter
from agent.issuer.tokens import SpentLedger, TokenRefused, verify_token
from agent.registry.model import Registry

log = logging.getLogger("tcpmesh.issuer")


@dataclass(frozen=True)
class Peer:
    address: str
    certificate_uri: str | None  # the verified client certificate's URI SAN, None without one
    certificate_der: bytes | None = None  # that certificate (DER): who signed it is checked for node credentials


@dataclass(frozen=True)
class Limits:
    max_svid_ttl_seconds: int = 3600
    min_ttl_seconds: int = 60
    node_svid_ttl_seconds: int = 3600


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class IssuerService:
    def __init__(self, ca: Any, registry: Callable[[], Registry | None], *, token_key: bytes | None,
                 ledger: SpentLedger | None, node_limiter: RateLimiter, join_limiter: RateLimiter,
                 metrics: Any = None, limits: Limits = Limits(), clock: Callable[[], datetime] = utcnow,
                 name: str = "issuer", attestor: Any = None) -> None:
        self.ca = ca
        self._registry = registry
        self._token_key, self._ledger = token_key, ledger
        self._node_limiter, self._join_limiter = node_limiter, join_limiter
        self._metrics = metrics
        self._attestor = attestor   # kubernetes_attestation.KubernetesAttestor, or None
        self.limits = limits
        self._clock = clock
        self.name = name

    # -- the entry point -----------------------------------------------------------------------
    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = protocol.decode_request(line)
        except ProtocolError as exc:
            return self._refuse("?", peer, None, exc.reason, str(exc))
        op = request["op"]
        untrusted = self._untrusted_credential(peer)
        if untrusted is not None:
            return self._refuse(op, peer, None, "untrusted_node_credential", untrusted)
        try:
            answer = {protocol.OP_HELLO: self._hello, protocol.OP_NODE: self._node,
                      protocol.OP_SIGN: self._sign}[op](request, peer)
        except ProtocolError as exc:
            return self._refuse(op, peer, None, exc.reason, str(exc))
        except Exception:  # the request's root: a bug answers "internal", the connection lives on
            log.exception("issuer: %s from %s failed", op, peer.address)
            return self._refuse(op, peer, None, "internal", "the issuer failed on this request; see its log")
        self._count(op, "ok" if answer.get("ok") else "refused")
        return answer

    # -- ops -----------------------------------------------------------------------------------
    def _hello(self, request: dict, peer: Peer) -> dict[str, Any]:
        return success(issuer=self.name, trust_domain=self.ca.trust_domain, bundle_pem=self.ca.bundle_pem,
                       ca={"fingerprint": self.ca.fingerprint, "root_fingerprint": self.ca.root_fingerprint},
                       max_svid_ttl_seconds=self.limits.max_svid_ttl_seconds,
                       node_svid_ttl_seconds=self.limits.node_svid_ttl_seconds,
                       node=self.node_of(peer))

    def _node(self, request: dict, peer: Peer) -> dict[str, Any]:
        node = field(request, "node", str)
        try:
            validate_node_name(node)
        except SpiffeIdError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
        csr = field(request, "csr", str)
        token = field(request, "token", str, required=False)
        sa_token = field(request, "service_account_token", str, required=False)
        credential_node = self.node_of(peer)
        claim, how = None, "node credential"
        if sa_token is not None:
            if token is not None:
                raise ProtocolError("bad_request", "send token or service_account_token, not both")
            how, refused = self._attest(node, sa_token, peer)
            if refused is not None:
                return refused
        elif credential_node is not None and token is None:
            if self._attestor is not None and self._attestor.exclusive:
                return self._refuse(None, peer, credential_node, "attestation_required", "this issuer renews node "
                                    "SVIDs only by Kubernetes attestation: send the agent pod's projected "
                                    "service-account token (identity.issuer.service_account_token_file)")
            if credential_node != node:
                return self._refuse(None, peer, credential_node, "wrong_node",
                                    f"this credential is node {credential_node!r}'s; it cannot renew node {node!r}")
            if not self._node_limiter.allow(node):
                return self._refuse(None, peer, node, "rate_limited", "too many requests from this node; retry later")
        else:
            if token is None:
                return self._refuse(None, peer, node, "no_node_credential",
                                    "a node SVID needs a bootstrap token (`tcpmesh issuer token <node>`) or a node "
                                    "credential of that node (`tcpmesh ca issue-node-credential`)")
            if not self._join_limiter.allow(f"addr:{peer.address}"):
                return self._refuse(None, peer, node, "rate_limited", "too many token joins from this address")
            if self._token_key is None or self._ledger is None:
                return self._refuse(None, peer, node, "bad_token", "this issuer accepts no bootstrap tokens "
                                    "(tokens.key_file is not set); use an operator-issued node credential")
            try:
                claim = verify_token(self._token_key, token, node, time.time())
            except TokenRefused as exc:
                return self._refuse(None, peer, node, exc.reason, str(exc))
            how = "bootstrap token"
        now = self._clock()
        try:
            wire = self.ca.sign_node(csr, node, self.limits.node_svid_ttl_seconds, now, self.limits.min_ttl_seconds)
        except IdentityError as exc:
            return self._refuse(None, peer, node, "bad_csr", str(exc))
        if claim is not None and not self._ledger.claim(claim, time.time()):  # type: ignore[union-attr]
            return self._refuse(None, peer, node, "replayed_token", "this bootstrap token was used already; each "
                                "token admits one join. Create a new one with `tcpmesh issuer token`")
        self._issued("node")
        log.info("issuer: node SVID for %s (%s) from %s: serial %x, valid until %s", node, how, peer.address,
                 wire["serial"], wire["not_after"])
        return success(svid=wire, bundle_pem=self.ca.bundle_pem)

    def _sign(self, request: dict, peer: Peer) -> dict[str, Any]:
        node = self.node_of(peer)
        if node is None:
            return self._refuse(None, peer, None, "no_node_credential",
                                "sign needs a node credential (spiffe://<td>/node/<name>) as the TLS client certificate")
        csrs = field(request, "csrs", list)
        if not 1 <= len(csrs) <= protocol.MAX_CSRS_PER_REQUEST:
            raise ProtocolError("bad_request", f"csrs must hold 1 to {protocol.MAX_CSRS_PER_REQUEST} entries")
        ttl = field(request, "ttl_seconds", int)
        ttl = min(ttl, self.limits.max_svid_ttl_seconds)
        if not self._node_limiter.allow(node, cost=len(csrs)):
            return self._refuse(None, peer, node, "rate_limited", f"node {node!r} asked for too many SVIDs; retry later")
        registry = self._registry()
        now = self._clock()
        svids, refused = [], {}
        for entry in csrs:
            if not isinstance(entry, dict):
                raise ProtocolError("bad_request", "each csrs entry is an object {spiffe_id, csr}")
            uri, csr = field(entry, "spiffe_id", str), field(entry, "csr", str)
            spiffe_id, why = authorize(registry, node, uri)
            if why is None:
                try:
                    svids.append(self.ca.sign_workload(csr, spiffe_id, ttl, now, self.limits.min_ttl_seconds))
                    self._issued("workload")
                    continue
                except IdentityError as exc:
                    why_reason, why_message = "bad_csr", str(exc)
            else:
                why_reason, why_message = why.reason, why.message
            self._refused_identity(peer, node, uri, why_reason, why_message)
            refused[uri] = {"reason": why_reason, "message": why_message}
        if svids:
            log.info("issuer: %d SVID(s) for node %s: %s", len(svids), node, ", ".join(s["spiffe_id"] for s in svids))
        return success(svids=svids, refused=refused, bundle_pem=self.ca.bundle_pem)

    def connection_key(self, peer: Peer) -> str:
        """Whose share of the server's connections this one counts against: the proven node, else the address."""
        node = None if self._untrusted_credential(peer) else self.node_of(peer)
        return f"node {node}" if node is not None else f"address {peer.address}"

    def refuse_connection(self, peer: Peer, limit: str, reason: str = "rate_limited") -> dict[str, Any]:
        return self._refuse("?", peer, None, reason, f"too many open connections: {limit}; close idle ones "
                            "(an agent needs one per call) and retry")

    def close(self) -> None:
        """At stop: end the attestor's threads (``KubernetesAttestor.close``: within its deadline + 1 s)."""
        if self._attestor is not None:
            self._attestor.close()

    def refuse_removed_root(self, peer: Peer, why: str) -> dict[str, Any]:
        """The answer to a client whose certificate chains to a root removed from the bundle (server.py, before any
        request is read): ``why`` names the root and the fix."""
        return self._refuse("?", peer, self.node_of(peer), "removed_root", why)

    def refuse_oversized(self, peer: Peer) -> dict[str, Any]:
        """The answer to a request line longer than the protocol allows (the server then closes)."""
        return self._refuse("?", peer, None, "bad_request", f"the request is longer than {protocol.MAX_LINE_BYTES} "
                            "bytes; the connection is closed")

    # -- helpers -------------------------------------------------------------------------------
    def _untrusted_credential(self, peer: Peer) -> str | None:
        if peer.certificate_der is None or self.node_of(peer) is None:
            return None
        return self.ca.node_credential_problem(peer.certificate_der)

    def _attest(self, node: str, sa_token: str, peer: Peer) -> tuple[str, dict[str, Any] | None]:
        """Kubernetes node attestation of ``node``: (how, None) if the token proves it, else (_, the refusal)."""
        if self._attestor is None:
            return "", self._refuse(None, peer, node, "attestation_off", "this issuer does not attest Kubernetes "
                                    "nodes (attestation.kubernetes.enabled is false); join with a bootstrap token or "
                                    "a node credential")
        if not self._join_limiter.allow(f"addr:{peer.address}"):
            return "", self._refuse(None, peer, node, "rate_limited", "too many attestation joins from this address")
        try:
            attested = self._attestor.attest(sa_token)
        except AttestationRefused as exc:
            return "", self._refuse(None, peer, node, exc.reason, str(exc))
        if attested.node != node:
            return "", self._refuse(None, peer, node, "wrong_node", f"the service-account token is pod "
                                    f"{attested.pod.key}'s, which runs on node {attested.node!r}: it cannot get "
                                    f"node {node!r}'s credential")
        return f"Kubernetes attestation: pod {attested.pod.key}", None

    def node_of(self, peer: Peer) -> str | None:
        if peer.certificate_uri is None:
            return None
        try:
            trust_domain, node = parse_node_id(peer.certificate_uri)
        except SpiffeIdError:
            return None  # a workload SVID or the issuer's own: not a node credential
        return node if trust_domain == self.ca.trust_domain else None

    def _refuse(self, op: str | None, peer: Peer, node: str | None, reason: str, message: str) -> dict[str, Any]:
        log.warning("issuer: refused %s from %s (node %s): %s: %s", op or "request", peer.address, node or "unproven",
                    reason, message)
        if self._metrics is not None:
            self._metrics.refusals.labels(reason=reason).inc()
        if op is not None:
            self._count(op if op in protocol.OPS else "invalid", "refused")
        return refusal(reason, message)

    def _refused_identity(self, peer: Peer, node: str, uri: str, reason: str, message: str) -> None:
        log.warning("issuer: refused %s to node %s (%s): %s: %s", uri, node, peer.address, reason, message)
        if self._metrics is not None:
            self._metrics.refusals.labels(reason=reason).inc()

    def _count(self, op: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(op=op, result=result).inc()

    def _issued(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.issued.labels(kind=kind).inc()
