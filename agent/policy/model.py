"""Policy objects as the loader produces them and the engine reads them. Pure data.

Semantics follow Istio's AuthorizationPolicy for TCP:
- ``selector`` picks workloads by name in the policy's namespace; no selector = every workload of
  the namespace; a policy in the root namespace (``policy.root_namespace``) applies mesh-wide.
- a ``Rule`` matches when any ``from`` source matches AND any ``to`` operation matches (an absent
  list matches everything); inside one source, principals AND namespaces must both match.
- no rules: matches nothing (an ALLOW policy without rules is "allow nothing").
- string patterns: exact, ``*`` (any), ``prefix*`` or ``*suffix``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class MtlsMode(enum.Enum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] | None = None  # None: the rule has no `from` (any source)
    operations: tuple[Operation, ...] | None = None  # None: no `to` (any port)


@dataclass(frozen=True)
class Origin:
    """Where an object was defined, for error messages and `policy explain`."""

    file: str
    line: int


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action
    workload: str | None = None  # selector; None selects every workload of the namespace
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    origin: Origin = Origin("<memory>", 0)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PeerAuthentication:
    name: str
    namespace: str
    mode: MtlsMode
    workload: str | None = None
    origin: Origin = Origin("<memory>", 0)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PolicySet:
    """Everything loaded from the policy directory, as one immutable snapshot."""

    authorization: tuple[AuthorizationPolicy, ...] = ()
    peer_authentication: tuple[PeerAuthentication, ...] = ()
    files: tuple[str, ...] = field(default=())
