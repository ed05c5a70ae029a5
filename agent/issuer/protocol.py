"""The issuer's wire protocol, version 1 (docs/identity.md "The issuer protocol"). Pure.

One JSON object per line (UTF-8, ``\\n``-terminated, at most ``MAX_LINE_BYTES``) in each direction over
one TLS 1.3 connection; answers come in request order; a connection may carry many requests.
Every request carries ``"v": 1`` and an ``op``; every answer ``"v"`` and ``"ok"``; a refusal
``{"ok": false, "error": {"reason": <one of REASONS>, "message": <words with the fix>}}``.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_LINE_BYTES = 64 * 1024
MAX_CSRS_PER_REQUEST = 64
DEFAULT_PORT = 15012

OP_HELLO = "hello"   # no credential needed: trust domain, bundle, limits (reachability probe)
OP_NODE = "node"     # a node SVID for a CSR: with a one-time bootstrap token, a Kubernetes service-account token
                     # ("service_account_token", attested), or a node credential of that node
OP_SIGN = "sign"     # workload SVIDs for CSRs: node credential required, placement checked per identity
OPS = (OP_HELLO, OP_NODE, OP_SIGN)

# Refusal reasons: the label of tcpmesh_issuer_refusals_total and the "reason" of an error answer.
REASONS = (
    "bad_request",            # not JSON, a missing or mistyped field, an unknown op
    "unsupported_version",    # "v" is not one this issuer speaks
    "no_node_credential",     # sign without a client certificate naming spiffe://<td>/node/<name>
    "untrusted_node_credential",  # a node certificate not signed by the issuer or the current root (e.g. a node CA's)
    "wrong_node",             # node asked for another node's SVID, or a token was issued for another node
    "bad_token",              # a bootstrap token that does not parse or whose MAC does not verify
    "expired_token",          # a bootstrap token past its expiry
    "replayed_token",         # a bootstrap token already spent (on any replica)
    "rate_limited",           # the node (or, for token joins, the source address) asked too often
    "unknown_node",           # the registry has no such node
    "not_on_node",            # the registry places no workload of this identity on the requesting node
    "wrong_trust_domain",     # an identity outside the issuer's trust domain
    "not_a_workload_identity",  # not spiffe://<td>/ns/<ns>/sa/<sa>
    "no_registry",            # the issuer has not loaded a registry yet
    "bad_csr",                # not a PKCS#10 P-256 request whose signature verifies
    # Kubernetes node attestation (a projected service-account token; kubernetes_attestation.py):
    "attestation_off",        # this issuer does not attest Kubernetes nodes (attestation.kubernetes.enabled)
    "attestation_required",   # a node credential cannot renew itself here: attest again with the token
    "attestation_unavailable",  # the Kubernetes API could not be asked (TokenReview or the pod)
    "bad_sa_token",           # the API did not authenticate the token, or it is not bound to a pod
    "wrong_audience",         # the token is not for the issuer's audience
    "wrong_service_account",  # the token (or its pod) is not the agent's service account
    "pod_gone",               # the token's pod is deleted, recreated, finished or unscheduled
    "attestation_timeout",    # the Kubernetes API did not finish the attestation within its deadline
    "internal",               # a bug or an unusable CA; the issuer logs it
    # The replica's own limits (server.py; docs/identity.md "Limits of one replica"). ``busy`` is answered when
    # it is the answer to a request or to a connection past the handshake; the others close the connection
    # (a reset before the handshake ends: the client tries its next issuer address) and are only counted.
    "busy",                   # a limit of the whole replica: connections, handshakes (oldest cut), attestations
    "address_limit",          # this source address holds its share of TLS handshakes already
    "handshake_timeout",      # no TLS handshake within limits.handshake_timeout_seconds
    "handshake_failed",       # not TLS 1.3, a certificate that does not verify, no ALPN tcpmesh-issuer/1
    "request_timeout",        # no complete first request within limits.request_timeout_seconds
    # A trust reload (server.py, trustroots.py): a root left the issuer's bundle (`tcpmesh ca rotate remove-old`)
    "removed_root",           # the client certificate chains to a removed root: answered right after the handshake
    "closed_by_trust_reload",  # an open connection under a root the reload removed: closed, only counted
)
CONNECTION_REASONS = ("busy", "address_limit", "handshake_timeout", "handshake_failed", "request_timeout",
                      "removed_root", "closed_by_trust_reload")


class ProtocolError(Exception):
    """A request line that is not a version-1 request (reason ``bad_request`` or ``unsupported_version``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    """A request object from one line; ``ProtocolError`` naming what is wrong."""
    try:
        doc = json.loads(line)
    except ValueError:
        raise ProtocolError("bad_request", "the request is not one JSON object on one line") from None
    except RecursionError:   # nested deeper than the parser goes: an attack, never a request of ours
        raise ProtocolError("bad_request", "the request nests JSON too deeply; requests are flat objects") from None
    if not isinstance(doc, dict):
        raise ProtocolError("bad_request", "the request is not a JSON object")
    if doc.get("v") not in SUPPORTED_VERSIONS:
        raise ProtocolError("unsupported_version", f"protocol version {doc.get('v')!r} is not supported; this issuer "
                            f"speaks {', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade the older side)")
    if doc.get("op") not in OPS:
        raise ProtocolError("bad_request", f"unknown op {doc.get('op')!r}; known: {', '.join(OPS)}")
    return doc


def field(doc: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError("bad_request", f"field {name!r} must be a {kind.__name__}")
    return value


def refusal(reason: str, message: str) -> dict[str, Any]:
    assert reason in REASONS, reason
    return {"v": VERSION, "ok": False, "error": {"reason": reason, "message": message}}


def success(**values: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, **values}
