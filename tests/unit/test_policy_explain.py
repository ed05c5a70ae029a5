"""`policy explain`'s wording for every decision path: the decision line, the reason, and for each
selecting policy exactly why it did or did not match (the field, the value, and the client's lack
of one), so the explanation never contradicts itself (#22: a DENY policy selecting the destination
is never "no policy selects it")."""

import pytest

from agent.errors import TcpmeshError
from agent.policy.explain import explain, format_explanation, request_for
from agent.policy.model import Action, AuthorizationPolicy, Operation, Origin, PolicySet, Rule, Source

TD = "spiffe://td"
SHOP = f"{TD}/ns/lab/sa/shop"
OTHER = f"{TD}/ns/dev/sa/laptop"


def pol(name, *rules, action=Action.ALLOW, workload="n2p2", dry=False, namespace="lab"):
    return AuthorizationPolicy(name, namespace, action, workload, tuple(rules), dry, Origin(f"/p/{name}.yaml", 1))


def src(principals=(), namespaces=(), not_principals=(), not_namespaces=()):
    return Source(tuple(principals), tuple(not_principals), tuple(namespaces), tuple(not_namespaces))


def rule(*sources, ports=(), not_ports=()):
    ops = (Operation(tuple(ports), tuple(not_ports)),) if ports or not_ports else None
    return Rule(tuple(sources) or None, ops)


DENY_SHOP = pol("deny-shop", rule(src([SHOP])), action=Action.DENY)

CASES = [
    # (id, policies, --from, port, default allow, expected lines (each must appear))
    ("no-policy-default-allow", [], "plaintext", 6379, True,
     ["ALLOW  plaintext -> lab/n2p2:6379", "because: allowed by default_action: no policy selects lab/n2p2",
      "selecting policies: none (no policy's selector and namespace cover lab/n2p2; default_action ALLOW decides)"]),
    ("no-policy-default-deny", [], SHOP, 6379, False,
     ["DENY  spiffe://td/ns/lab/sa/shop -> lab/n2p2:6379", "because: denied by default_action: no policy selects"]),
    ("selector-elsewhere", [pol("other", rule(), workload="n2p1")], SHOP, 6379, True,
     ["because: allowed by default_action: no policy selects lab/n2p2", "selecting policies: none"]),
    ("issue-22-plaintext-vs-deny-principals", [DENY_SHOP], "plaintext", 6379, True,
     ["ALLOW  plaintext -> lab/n2p2:6379",
      "because: allowed by default_action: no ALLOW policy selects lab/n2p2 and no DENY policy selecting it "
      "matches (lab/deny-shop)",
      "lab/deny-shop (DENY, /p/deny-shop.yaml:1): did not deny: no rule matches: rule 0: from[0]: principals "
      "[spiffe://td/ns/lab/sa/shop] name identities, which a plaintext client (no mTLS) has none of"]),
    ("deny-matches", [DENY_SHOP], SHOP, 6379, True,
     ["DENY  spiffe://td/ns/lab/sa/shop -> lab/n2p2:6379", "because: denied by DENY policy lab/deny-shop rule 0",
      "policy:  lab/deny-shop (/p/deny-shop.yaml:1), rule 0",
      "lab/deny-shop (DENY, /p/deny-shop.yaml:1): DECIDED: rule 0 matches"]),
    ("deny-other-principal", [DENY_SHOP], OTHER, 6379, True,
     ["did not deny: no rule matches: rule 0: from[0]: principal spiffe://td/ns/dev/sa/laptop is not one of "
      "principals [spiffe://td/ns/lab/sa/shop]"]),
    ("allow-matches", [pol("only-shop", rule(src([SHOP]), ports=[6379]))], SHOP, 6379, False,
     ["ALLOW  spiffe://td/ns/lab/sa/shop -> lab/n2p2:6379", "because: allowed by ALLOW policy lab/only-shop rule 0",
      "lab/only-shop (ALLOW, /p/only-shop.yaml:1): DECIDED: rule 0 matches"]),
    ("allow-port-miss", [pol("only-shop", rule(src([SHOP]), ports=[5432]))], SHOP, 6379, True,
     ["DENY  spiffe://td/ns/lab/sa/shop -> lab/n2p2:6379",
      "because: no rule of the ALLOW policies selecting lab/n2p2 matches (lab/only-shop)",
      "lab/only-shop (ALLOW, /p/only-shop.yaml:1): DECIDED: no rule matches: rule 0: to[0]: port 6379 is not "
      "one of ports [5432]"]),
    ("allow-source-and-port-miss", [pol("only-shop", rule(src([SHOP]), ports=[5432]))], OTHER, 6379, True,
     ["rule 0: from[0]: principal spiffe://td/ns/dev/sa/laptop is not one of principals [spiffe://td/ns/lab/sa/shop] "
      "and to[0]: port 6379 is not one of ports [5432]"]),
    ("allow-not-ports", [pol("no-ssh", rule(not_ports=[22]))], SHOP, 22, True,
     ["rule 0: to[0]: port 22 is excluded by notPorts [22]"]),
    ("allow-namespace-plaintext", [pol("from-lab", rule(src(namespaces=["lab"])))], "plaintext", 6379, True,
     ["rule 0: from[0]: namespaces [lab] name the client's namespace, which a plaintext client (no identity) has none of"]),
    ("allow-namespace-miss", [pol("from-lab", rule(src(namespaces=["lab"])))], OTHER, 6379, True,
     ["rule 0: from[0]: source namespace dev is not one of namespaces [lab]"]),
    ("allow-not-principals", [pol("not-shop", rule(src(["*"], not_principals=[SHOP])))], SHOP, 6379, True,
     ["rule 0: from[0]: principal spiffe://td/ns/lab/sa/shop is excluded by notPrincipals [spiffe://td/ns/lab/sa/shop]"]),
    ("allow-not-namespaces", [pol("not-lab", rule(src(not_namespaces=["lab"])))], SHOP, 6379, True,
     ["rule 0: from[0]: source namespace lab is excluded by notNamespaces [lab]"]),
    ("allow-two-sources", [pol("two", rule(src([OTHER]), src(namespaces=["x"])))], SHOP, 6379, True,
     ["rule 0: none of its sources/operations matches (from[0]: principal spiffe://td/ns/lab/sa/shop is not one of "
      "principals [spiffe://td/ns/dev/sa/laptop]; from[1]: source namespace lab is not one of namespaces [x])"]),
    ("allow-without-rules", [pol("nothing")], SHOP, 6379, True,
     ["because: no rule of the ALLOW policies selecting lab/n2p2 matches (lab/nothing)",
      "lab/nothing (ALLOW, /p/nothing.yaml:1): DECIDED: it has no rules, so it matches nothing"]),
    ("allow-empty-rule", [pol("all", Rule())], "plaintext", 6379, False,
     ["ALLOW  plaintext -> lab/n2p2:6379", "DECIDED: rule 0 matches"]),
    ("second-rule-matches", [pol("two-rules", rule(src([OTHER])), rule(ports=[6379]))], SHOP, 6379, True,
     ["because: allowed by ALLOW policy lab/two-rules rule 1", "DECIDED: rule 1 matches"]),
    ("deny-beats-allow", [pol("all", Rule()), DENY_SHOP], SHOP, 6379, True,
     ["because: denied by DENY policy lab/deny-shop rule 0",
      "lab/all (ALLOW, /p/all.yaml:1): matched: rule 0 matches",
      "lab/deny-shop (DENY, /p/deny-shop.yaml:1): DECIDED: rule 0 matches"]),
    ("allow-elsewhere-not-matched", [pol("a", rule(src([OTHER]))), pol("b", rule(src([SHOP])))], SHOP, 6379, True,
     ["because: allowed by ALLOW policy lab/b rule 0", "lab/a (ALLOW, /p/a.yaml:1): did not allow: no rule matches"]),
    ("mesh-wide-root-namespace", [pol("root-deny", rule(src([SHOP])), action=Action.DENY, workload=None,
                                      namespace="tcpmesh-system")], SHOP, 6379, True,
     ["because: denied by DENY policy tcpmesh-system/root-deny rule 0"]),
    ("dry-run-only", [pol("would-deny", rule(src([SHOP])), action=Action.DENY, dry=True)], SHOP, 6379, True,
     ["because: allowed by default_action: no enforced policy selects lab/n2p2",
      "dry-run: would deny (denied by DENY policy lab/would-deny rule 0)",
      "lab/would-deny (DENY, dry-run, /p/would-deny.yaml:1): dry-run: evaluated on the side, never enforced: "
      "rule 0 matches"]),
    ("audit-only", [pol("watch", rule(src([SHOP])), action=Action.AUDIT)], SHOP, 6379, True,
     ["because: allowed by default_action: no enforced policy selects lab/n2p2", "audited by: lab/watch",
      "lab/watch (AUDIT, /p/watch.yaml:1): AUDIT: records a match, never decides (matched): rule 0 matches"]),
]


@pytest.mark.parametrize("policies, source, port, default_allow, lines", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_explain_wording(policies, source, port, default_allow, lines):
    doc = explain(PolicySet(tuple(policies)), request_for(source, "lab/n2p2", port), default_allow=default_allow,
                  root_namespace="tcpmesh-system")
    text = format_explanation(doc)
    for line in lines:
        assert line in text, f"missing {line!r} in:\n{text}"


def test_the_explanation_never_says_no_policy_selects_a_destination_a_policy_selects():
    for _, policies, source, port, default_allow, _ in CASES:
        doc = explain(PolicySet(tuple(policies)), request_for(source, "lab/n2p2", port), default_allow=default_allow,
                      root_namespace="tcpmesh-system")
        if doc["policies"]:
            assert "no policy selects" not in doc["reason"], doc["reason"]


@pytest.mark.parametrize("source, target, message", [
    ("plaintext", "n2p2", "--to 'n2p2': use NAMESPACE/NAME"),
    ("plaintext", "lab/a/b", "--to 'lab/a/b': use NAMESPACE/NAME"),
    ("shop", "lab/n2p2", "--from 'shop':"),
])
def test_malformed_options_are_named(source, target, message):
    with pytest.raises(TcpmeshError, match=message):
        request_for(source, target, 1)
