"""The pure decision engine over every semantic case: DENY beats ALLOW, selector miss, namespace vs
principal match, dry-run, AUDIT, default action, patterns, ports, mesh-wide root policies."""

import pytest

from agent.policy.engine import Request, decide, mtls_mode
from agent.policy.model import (Action, AuthorizationPolicy, MtlsMode, Operation, PeerAuthentication, PolicySet,
                                Rule, Source)

TD = "spiffe://td"
ORDERS = f"{TD}/ns/shop/sa/orders"
BILLING = f"{TD}/ns/billing/sa/invoicer"
INTRUDER = f"{TD}/ns/dev/sa/laptop"


def req(principal, port=5432, workload="postgres", namespace="data"):
    ns = principal.split("/ns/")[1].split("/")[0] if principal else None
    return Request(principal, ns, workload, namespace, port)


def allow(name, *rules, workload="postgres", namespace="data", dry=False, action=Action.ALLOW):
    return AuthorizationPolicy(name, namespace, action, workload, tuple(rules), dry)


def rule(principals=(), namespaces=(), ports=(), not_ports=(), not_principals=()):
    sources = (Source(tuple(principals), tuple(not_principals), tuple(namespaces)),) \
        if principals or namespaces or not_principals else None
    ops = (Operation(tuple(ports), tuple(not_ports)),) if ports or not_ports else None
    return Rule(sources, ops)


ORDERS_DB = allow("orders-db", rule(principals=[ORDERS], ports=[5432]), rule(namespaces=["billing"], ports=[5432]))
DENY_DEV = allow("no-dev", rule(namespaces=["dev"]), workload=None, action=Action.DENY)
DENY_ORDERS = allow("no-orders", rule(principals=[ORDERS]), action=Action.DENY)

CASES = [
    # (policies, request, default_allow, allowed, deciding policy, words in reason)
    ([], req(INTRUDER), True, True, None, "default_action"),
    ([], req(INTRUDER), False, False, None, "default_action"),
    ([ORDERS_DB], req(ORDERS), True, True, "data/orders-db", "rule 0"),
    ([ORDERS_DB], req(BILLING), True, True, "data/orders-db", "rule 1"),  # namespace match
    ([ORDERS_DB], req(INTRUDER), True, False, "data/orders-db", "no rule"),
    ([ORDERS_DB], req(ORDERS, port=6379), True, False, "data/orders-db", "no rule"),  # port miss
    ([ORDERS_DB], req(INTRUDER, workload="redis"), False, False, None, "default_action"),  # selector miss
    ([ORDERS_DB], req(INTRUDER, workload="redis"), True, True, None, "default_action"),
    ([ORDERS_DB, DENY_ORDERS], req(ORDERS), True, False, "data/no-orders", "DENY"),  # DENY beats ALLOW
    ([DENY_DEV, ORDERS_DB], req(INTRUDER), True, False, "data/no-dev", "DENY"),
    ([allow("nothing")], req(ORDERS), True, False, "data/nothing", "no rule"),  # ALLOW without rules
    ([allow("all", Rule())], req(INTRUDER), False, True, "data/all", "rule 0"),  # empty rule matches all
    ([allow("pfx", rule(principals=[f"{TD}/ns/shop/*"]))], req(ORDERS), True, True, "data/pfx", ""),
    ([allow("sfx", rule(principals=["*/sa/laptop"]))], req(INTRUDER), True, True, "data/sfx", ""),
    ([allow("notp", rule(principals=["*"], not_principals=[INTRUDER]))], req(INTRUDER), True, False, "data/notp", ""),
    ([allow("notport", rule(not_ports=[22]))], req(INTRUDER, port=22), True, False, "data/notport", ""),
    ([allow("plain", rule(principals=["*"]))], req(None), True, False, "data/plain", "no rule"),  # plaintext
    ([allow("other-ns", Rule(), namespace="shop")], req(INTRUDER), False, False, None, "default_action"),
    ([allow("mesh-wide", rule(namespaces=["dev"]), workload=None, namespace="tcpmesh-system",
            action=Action.DENY)], req(INTRUDER), True, False, "tcpmesh-system/mesh-wide", "DENY"),
]


@pytest.mark.parametrize("policies, request_, default_allow, allowed, policy, words", CASES)
def test_decision_table(policies, request_, default_allow, allowed, policy, words):
    decision = decide(PolicySet(tuple(policies)), request_, default_allow=default_allow)
    assert decision.allowed is allowed
    assert decision.policy == policy
    assert words in decision.reason


def test_dry_run_policies_are_reported_never_enforced():
    dry_deny = allow("would-deny", rule(principals=[ORDERS]), action=Action.DENY, dry=True)
    decision = decide(PolicySet((ORDERS_DB, dry_deny)), req(ORDERS))
    assert decision.allowed and decision.policy == "data/orders-db"
    assert decision.dry_run.startswith("deny") and "data/would-deny" in decision.dry_run
    dry_allow = allow("would-allow-nothing", dry=True)
    decision = decide(PolicySet((dry_allow,)), req(ORDERS))
    assert decision.allowed and decision.dry_run.startswith("deny")


def test_audit_policies_record_and_do_not_decide():
    audit = allow("watch", rule(namespaces=["shop"]), action=Action.AUDIT)
    decision = decide(PolicySet((audit,)), req(ORDERS), default_allow=False)
    assert not decision.allowed and decision.audited_by == ("data/watch",)
    assert decide(PolicySet((audit,)), req(BILLING)).audited_by == ()


def test_considered_lists_every_selecting_policy():
    decision = decide(PolicySet((ORDERS_DB, DENY_DEV, allow("x", workload="redis"))), req(ORDERS))
    assert set(decision.considered) == {"data/orders-db", "data/no-dev"}


def test_most_specific_peer_authentication_wins():
    policies = PolicySet((), (
        PeerAuthentication("mesh", "tcpmesh-system", MtlsMode.STRICT),
        PeerAuthentication("ns", "data", MtlsMode.PERMISSIVE),
        PeerAuthentication("pg", "data", MtlsMode.STRICT, "postgres"),
    ))
    assert mtls_mode(policies, "data", "postgres") is MtlsMode.STRICT
    assert mtls_mode(policies, "data", "redis") is MtlsMode.PERMISSIVE
    assert mtls_mode(policies, "shop", "web") is MtlsMode.STRICT
    assert mtls_mode(PolicySet(), "shop", "web") is MtlsMode.PERMISSIVE
