"""`tcpmesh policy explain`: the decision for one connection, and for every policy that selects the
destination exactly why it did or did not match — rule by rule, source by source, naming the field
(a rule that names principals cannot match a plaintext client, which has none). Pure: takes a
``PolicySet`` (the agent's set in force, or files loaded offline) and returns a JSON-ready dict;
``format_explanation`` renders it. The decision itself comes from the engine, never recomputed here.
"""

from __future__ import annotations

from typing import Any

from agent.errors import TcpmeshError
from agent.identity.spiffe import SpiffeId, SpiffeIdError
from agent.policy.engine import Request, decide, matches_pattern, selects
from agent.policy.model import Action, AuthorizationPolicy, Operation, PolicySet, Rule, Source

PLAINTEXT = "plaintext"


def request_for(source: str, target: str, port: int) -> Request:
    """The engine's Request for --from/--to/--port; a TcpmeshError naming the option when one is malformed."""
    namespace, _, workload = target.partition("/")
    if not namespace or not workload or "/" in workload:
        raise TcpmeshError(f"--to {target!r}: use NAMESPACE/NAME, e.g. lab/n2p2")
    if source == PLAINTEXT:
        return Request(None, None, workload, namespace, port)
    try:
        principal = SpiffeId.parse(source)
    except SpiffeIdError as exc:
        raise TcpmeshError(f"--from {source!r}: {exc}; or use 'plaintext' for a client without identity") from None
    return Request(principal.uri, principal.namespace, workload, namespace, port)


def explain(policies: PolicySet, request: Request, *, default_allow: bool, root_namespace: str) -> dict[str, Any]:
    decision = decide(policies, request, default_allow=default_allow, root_namespace=root_namespace)
    selecting = [p for p in policies.authorization if selects(p, request, root_namespace)]
    return {
        "allowed": decision.allowed, "reason": decision.reason, "policy": decision.policy, "rule": decision.rule_index,
        "dry_run": decision.dry_run, "audited_by": list(decision.audited_by),
        "considered": list(decision.considered),
        "default_action": "ALLOW" if default_allow else "DENY",
        "source": request.source_principal or PLAINTEXT,
        "destination": f"{request.destination_namespace}/{request.destination_workload}", "port": request.port,
        "policies": [_policy(p, request) for p in selecting],
    }


def _policy(policy: AuthorizationPolicy, request: Request) -> dict[str, Any]:
    kind = "AUDIT" if policy.action is Action.AUDIT else policy.action.value
    rules = [_rule(index, rule, request) for index, rule in enumerate(policy.rules)]
    matched = next((r["index"] for r in rules if r["matches"]), None)
    if not policy.rules:
        why = "it has no rules, so it matches nothing"
    elif matched is not None:
        why = f"rule {matched} matches"
    else:
        why = "no rule matches: " + "; ".join(f"rule {r['index']}: {r['why']}" for r in rules)
    return {"policy": policy.key, "action": kind, "dry_run": policy.dry_run, "file": policy.origin.file,
            "line": policy.origin.line, "selector": policy.workload, "matched_rule": matched, "why": why,
            "rules": rules}


def _rule(index: int, rule: Rule, request: Request) -> dict[str, Any]:
    misses = []
    if rule.sources is not None:
        source_misses = [_source_miss(s, request) for s in rule.sources]
        if all(source_misses):
            misses.append(_either(f"from[{i}]: {m}" for i, m in enumerate(source_misses)))
    if rule.operations is not None:
        operation_misses = [_operation_miss(o, request.port) for o in rule.operations]
        if all(operation_misses):
            misses.append(_either(f"to[{i}]: {m}" for i, m in enumerate(operation_misses)))
    if misses:
        return {"index": index, "matches": False, "why": " and ".join(misses)}
    scope = [("any source" if rule.sources is None else "its source matches"),
             ("any port" if rule.operations is None else f"port {request.port} matches")]
    return {"index": index, "matches": True, "why": ", ".join(scope)}


def _either(parts) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else "none of its sources/operations matches (" + "; ".join(parts) + ")"


def _listed(patterns: tuple) -> str:
    return ", ".join(str(p) for p in patterns)


def _source_miss(source: Source, request: Request) -> str:
    """Why ``source`` does not match the request's client; "" when it does."""
    return (_field_miss("principal", "principals", source.principals, source.not_principals,
                        request.source_principal, "name identities, which a plaintext client (no mTLS) has none of")
            or _field_miss("source namespace", "namespaces", source.namespaces, source.not_namespaces,
                           request.source_namespace,
                           "name the client's namespace, which a plaintext client (no identity) has none of"))


def _field_miss(what: str, field: str, patterns: tuple[str, ...], not_patterns: tuple[str, ...], value: str | None,
                absent: str) -> str:
    """Why ``value`` misses ``field`` (and its not-field); "" when it matches. ``absent``: said of a plaintext client."""
    if patterns:
        if value is None:
            return f"{field} [{_listed(patterns)}] {absent}"
        if not any(matches_pattern(p, value) for p in patterns):
            return f"{what} {value} is not one of {field} [{_listed(patterns)}]"
    excluded = [p for p in not_patterns if matches_pattern(p, value)]
    if excluded:
        return f"{what} {value} is excluded by not{field[0].upper()}{field[1:]} [{_listed(excluded)}]"
    return ""


def _operation_miss(operation: Operation, port: int) -> str:
    if operation.ports and port not in operation.ports:
        return f"port {port} is not one of ports [{_listed(operation.ports)}]"
    if port in operation.not_ports:
        return f"port {port} is excluded by notPorts [{_listed(operation.not_ports)}]"
    return ""


def _verdict(p: dict[str, Any], doc: dict[str, Any]) -> str:
    """What this policy did to the decision, in words."""
    if p["dry_run"]:
        return "dry-run: evaluated on the side, never enforced"
    if p["action"] == "AUDIT":
        return "AUDIT: records a match, never decides" + (" (matched)" if p["matched_rule"] is not None else "")
    if p["policy"] == doc["policy"]:
        return "DECIDED"
    if p["action"] == "DENY":
        return "did not deny" if p["matched_rule"] is None else "matched"
    return "did not allow" if p["matched_rule"] is None else "matched"


def format_explanation(doc: dict[str, Any]) -> str:
    lines = [f"{'ALLOW' if doc['allowed'] else 'DENY'}  {doc['source']} -> {doc['destination']}:{doc['port']}",
             f"  because: {doc['reason']}"]
    for p in doc["policies"]:
        if p["policy"] == doc["policy"]:
            lines.append(f"  policy:  {p['policy']} ({p['file']}:{p['line']})"
                         + (f", rule {doc['rule']}" if doc["rule"] is not None else ""))
    if doc["dry_run"]:
        lines.append(f"  dry-run: would {doc['dry_run']}")
    if doc["audited_by"]:
        lines.append(f"  audited by: {', '.join(doc['audited_by'])}")
    if not doc["policies"]:
        lines.append(f"  selecting policies: none (no policy's selector and namespace cover {doc['destination']}; "
                     f"default_action {doc['default_action']} decides)")
    else:
        lines.append("  selecting policies:")
    for p in doc["policies"]:
        lines.append(f"    {p['policy']} ({p['action']}{', dry-run' if p['dry_run'] else ''}, {p['file']}:{p['line']}): "
                     f"{_verdict(p, doc)}: {p['why']}")
    return "\n".join(lines)
