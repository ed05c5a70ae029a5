"""SPIFFE IDs of the form ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Pure: parsing, formatting, and the SNI name a tunnel uses to ask for an identity's certificate.
Imports nothing from the outside world.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from agent.errors import TcpmeshError

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
# A trust domain is a lower-case DNS-like name (SPIFFE spec: letters, digits, '.', '-', '_').
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
# Kubernetes namespaces are DNS labels; service accounts are DNS subdomains.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL_MAX = 63
SNI_SUFFIX_LABEL = "id"
# TLS clients refuse server names longer than a DNS name (253) or with labels over 63 characters.
MAX_SNI_LENGTH = 253


class SpiffeIdError(TcpmeshError, ValueError):
    """A string is not a tcpmesh SPIFFE ID; the message says which part is wrong."""


def _labels_ok(name: str) -> bool:
    """Every dot-separated label is 1..63 characters (so the name can appear in a TLS server name)."""
    return all(0 < len(label) <= _DNS_LABEL_MAX for label in name.split("."))


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.match(trust_domain or "") or not _labels_ok(trust_domain):
        raise SpiffeIdError(
            f"trust domain {trust_domain!r} is not valid: use lower-case letters, digits, '.', '-', '_' "
            "in dot-separated labels of 1 to 63 characters (for example 'cluster.local')"
        )
    return trust_domain


def validate_namespace(namespace: str) -> str:
    if not _DNS_LABEL.match(namespace or ""):
        raise SpiffeIdError(
            f"namespace {namespace!r} is not a DNS label (lower-case letters, digits and '-', at most 63)"
        )
    return namespace


def validate_service_account(service_account: str) -> str:
    if not _DNS_SUBDOMAIN.match(service_account or "") or not _labels_ok(service_account):
        raise SpiffeIdError(
            f"service account {service_account!r} is not a DNS subdomain "
            "(lower-case letters, digits, '-' and '.', labels of at most 63, at most 253 in all)"
        )
    return service_account


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_namespace(self.namespace)
        validate_service_account(self.service_account)
        if len(self.sni) > MAX_SNI_LENGTH:
            raise SpiffeIdError(
                f"{self.uri}: its TLS server name {self.sni!r} is {len(self.sni)} characters long, "
                f"the limit is {MAX_SNI_LENGTH}; use a shorter service account or trust domain"
            )

    @classmethod
    def parse(cls, text: str) -> "SpiffeId":
        if not isinstance(text, str):
            raise SpiffeIdError(f"SPIFFE ID must be a string, got {type(text).__name__}")
        if len(text) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is {len(text)} characters long, the limit is {MAX_ID_LENGTH}")
        if not text.startswith(SCHEME):
            raise SpiffeIdError(f"{text!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
        rest = text[len(SCHEME):]
        if "?" in rest or "#" in rest:
            raise SpiffeIdError(f"{text!r}: a SPIFFE ID has no query or fragment")
        trust_domain, _, path = rest.partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise SpiffeIdError(
                f"{text!r}: expected the path /ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain, parts[1], parts[3])

    @functools.cached_property  # one string per identity, not one per flow that names it
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def sni(self) -> str:
        """The TLS server name a client sends to ask a node's inbound proxy for this identity.

        ``<service-account>.<namespace>.id.<trust-domain>``: namespaces are single DNS labels, so
        within one trust domain the name is unambiguous when read from the right (strip
        ``.id.<trust-domain>``, the last label left is the namespace). Across trust domains it is
        not (``a.b.id.id.x`` is both ``(td=id.x, ns=b, sa=a)`` and ``(td=x, ns=id, sa=a.b)``), so
        SNI names are only ever looked up among identities of one trust domain.
        """
        return f"{self.service_account}.{self.namespace}.{SNI_SUFFIX_LABEL}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri


# Node credentials (docs/identity.md "The issuer"): ``spiffe://<td>/node/<name>``, used as a TLS client
# certificate towards the issuer only. The path has two segments, so ``SpiffeId.parse`` (workloads) never
# accepts one: a node SVID can never stand for a workload on a tunnel.
NODE_SEGMENT = "node"
# The issuer's server certificate names this, so an agent can check it reached the issuer, not a node.
ISSUER_PATH = "/tcpmesh/issuer"
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def validate_node_name(node: str) -> str:
    if not isinstance(node, str) or not _NODE_NAME.match(node):
        raise SpiffeIdError(f"node name {node!r} is not valid: use 1-63 lower-case letters, digits, '.', '-' or '_', "
                            "starting and ending with a letter or digit (the node's name in the registry)")
    return node


def node_id_uri(trust_domain: str, node: str) -> str:
    """``spiffe://<td>/node/<node>``: the SPIFFE ID of a node credential."""
    return f"{SCHEME}{validate_trust_domain(trust_domain)}/{NODE_SEGMENT}/{validate_node_name(node)}"


def parse_node_id(text: str) -> tuple[str, str]:
    """(trust domain, node) of a node credential's SPIFFE ID; ``SpiffeIdError`` for anything else."""
    if not isinstance(text, str) or not text.startswith(SCHEME) or len(text) > MAX_ID_LENGTH:
        raise SpiffeIdError(f"{text!r} is not a node SPIFFE ID (spiffe://<trust-domain>/node/<name>)")
    trust_domain, _, path = text[len(SCHEME):].partition("/")
    parts = path.split("/")
    if len(parts) != 2 or parts[0] != NODE_SEGMENT:
        raise SpiffeIdError(f"{text!r} is not a node SPIFFE ID (spiffe://<trust-domain>/node/<name>)")
    return validate_trust_domain(trust_domain), validate_node_name(parts[1])


def issuer_id_uri(trust_domain: str) -> str:
    """``spiffe://<td>/tcpmesh/issuer``: the SPIFFE ID in the issuer's server certificate."""
    return f"{SCHEME}{validate_trust_domain(trust_domain)}{ISSUER_PATH}"
