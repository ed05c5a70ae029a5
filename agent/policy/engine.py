"""The decision engine: who may connect to which workload on which port. Pure.

Order (Istio): AUDIT policies only record; enforced DENY policies first — any match denies; then, if
any enforced ALLOW policy selects the destination, one of them must match, else deny; if none
selects it, ``default_action`` decides. Dry-run policies are evaluated the same way on the side and
reported, never enforced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.policy.model import Action, AuthorizationPolicy, MtlsMode, Operation, PolicySet, Rule, Source


@dataclass(frozen=True)
class Request:
    source_principal: str | None  # spiffe://td/ns/x/sa/y, None for plaintext
    source_namespace: str | None
    destination_workload: str
    destination_namespace: str
    port: int


@dataclass(frozen=True)
class Match:
    policy: AuthorizationPolicy
    rule_index: int  # which rule matched (0-based)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # namespace/name of the deciding policy, None for the default action
    rule_index: int | None = None
    dry_run: str | None = None  # what enforced dry-run policies would have decided, if any selected
    audited_by: tuple[str, ...] = ()
    considered: tuple[str, ...] = field(default=())  # every policy that selected the destination


def selects(policy: AuthorizationPolicy | object, request: Request, root_namespace: str) -> bool:
    namespace, workload = getattr(policy, "namespace"), getattr(policy, "workload")
    if namespace != root_namespace and namespace != request.destination_namespace:
        return False
    return workload is None or workload == request.destination_workload


def matches_pattern(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    return any(matches_pattern(p, value) for p in patterns)


def source_matches(source: Source, request: Request) -> bool:
    return ((not source.principals or _any(source.principals, request.source_principal))
            and not _any(source.not_principals, request.source_principal)
            and (not source.namespaces or _any(source.namespaces, request.source_namespace))
            and not _any(source.not_namespaces, request.source_namespace))


def operation_matches(operation: Operation, request: Request) -> bool:
    return ((not operation.ports or request.port in operation.ports) and request.port not in operation.not_ports)


def rule_matches(rule: Rule, request: Request) -> bool:
    return ((rule.sources is None or any(source_matches(s, request) for s in rule.sources))
            and (rule.operations is None or any(operation_matches(o, request) for o in rule.operations)))


def first_match(policy: AuthorizationPolicy, request: Request) -> Match | None:
    for index, rule in enumerate(policy.rules):
        if rule_matches(rule, request):
            return Match(policy, index)
    return None


def _evaluate(policies: list[AuthorizationPolicy], request: Request, default_allow: bool,
              side_only: bool = False) -> Decision:
    """``side_only``: dry-run or AUDIT policies select the destination, but none that is enforced."""
    for policy in (p for p in policies if p.action is Action.DENY):
        match = first_match(policy, request)
        if match:
            return Decision(False, f"denied by DENY policy {policy.key} rule {match.rule_index}", policy.key,
                            match.rule_index)
    allow = [p for p in policies if p.action is Action.ALLOW]
    for policy in allow:
        match = first_match(policy, request)
        if match:
            return Decision(True, f"allowed by ALLOW policy {policy.key} rule {match.rule_index}", policy.key,
                            match.rule_index)
    if allow:
        return Decision(False, f"no rule of the ALLOW policies selecting {request.destination_namespace}/"
                               f"{request.destination_workload} matches ({', '.join(p.key for p in allow)})",
                        allow[0].key)
    verdict = "allowed" if default_allow else "denied"
    destination = f"{request.destination_namespace}/{request.destination_workload}"
    if policies:  # DENY policies selected the destination, none matched, and no ALLOW policy selects it
        return Decision(default_allow, f"{verdict} by default_action: no ALLOW policy selects {destination} and "
                                       f"no DENY policy selecting it matches ({', '.join(p.key for p in policies)})")
    return Decision(default_allow, f"{verdict} by default_action: no {'enforced ' if side_only else ''}policy "
                                   f"selects {destination}")


def decide(policies: PolicySet, request: Request, *, default_allow: bool = True,
           root_namespace: str = "tcpmesh-system") -> Decision:
    selecting = [p for p in policies.authorization if selects(p, request, root_namespace)]
    enforced = [p for p in selecting if not p.dry_run and p.action is not Action.AUDIT]
    decision = _evaluate(enforced, request, default_allow, side_only=len(enforced) < len(selecting))
    dry = [p for p in selecting if p.dry_run and p.action is not Action.AUDIT]
    dry_note = None
    if dry:
        would = _evaluate(enforced + dry, request, default_allow)
        dry_note = f"{'allow' if would.allowed else 'deny'} ({would.reason})"
    audited = tuple(p.key for p in selecting if p.action is Action.AUDIT and first_match(p, request))
    return Decision(decision.allowed, decision.reason, decision.policy, decision.rule_index, dry_note, audited,
                    tuple(p.key for p in selecting))


def mtls_mode(policies: PolicySet, namespace: str, workload: str, *, default: MtlsMode = MtlsMode.PERMISSIVE,
              root_namespace: str = "tcpmesh-system") -> MtlsMode:
    """The most specific PeerAuthentication wins: workload selector > namespace > root namespace."""
    request = Request(None, None, workload, namespace, 0)
    ranked = sorted((p for p in policies.peer_authentication if selects(p, request, root_namespace)),
                    key=lambda p: (p.workload is not None, p.namespace != root_namespace), reverse=True)
    return ranked[0].mode if ranked else default
