"""Fuzzing the policy loader (agent/policy/loader.py) and the engine with Hypothesis.

Inputs are mostly valid, so the accept path is exercised, and the invalid ones are near misses:
``document_from`` builds a policy from the loader's own vocabulary (kinds, metadata, selectors,
actions, rules with from/to in both the flat and Istio's nested form, patterns, ports) and then, for
about one document in four, breaks exactly one thing (``MUTATIONS``: a port out of range, an action
in the wrong case, a '*' inside a pattern, an unknown field, ...).

Properties:
- an unbroken document is accepted and usable; a broken one is refused with a PolicyError naming
  the file, the line and the broken field — nothing else is ever raised;
- a DENY policy that denies a request still denies it when ALLOW policies are added and when the
  default action is allow (DENY before ALLOW);
- a request to a workload no policy selects gets ``default_action``, and no policy is named;
- in a YAML file, the line of the error is the line of the broken field;
- at least the stated share of generated inputs is accepted (``test_the_generators_mostly_build_
  valid_policies``, seeded), so a loader that refused everything would fail.
"""

from __future__ import annotations

import random

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.policy import engine
from agent.policy.loader import PolicyError, _LineDict, load_file, parse_document
from agent.policy.model import Action, AuthorizationPolicy, MtlsMode, PeerAuthentication, PolicySet

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = ["web", "orders-db", "a.b", "db1", "tcpmesh-system"]
NAMESPACES = ["shop", "data", "billing", "tcpmesh-system"]
WORKLOADS = ["web", "db", "cache"]
PRINCIPALS = ["*", "spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/*", "*/sa/web", "spiffe://*",
              "spiffe://td/ns/billing/sa/x", "*/sa/db"]
NAMESPACE_PATTERNS = ["shop", "billing", "*", "sh*", "*ing", "data"]
PORTS = [80, 5432, "6379", 65535, 1, "08"]
ACTIONS = ["ALLOW", "DENY", "AUDIT"]
MODES = ["STRICT", "PERMISSIVE"]
ROOT = "tcpmesh-system"


class Genome:
    """Reads choices off bytes (Hypothesis's cheapest input); past the end every choice is 1."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 1

    def pick(self, options):
        return options[self.byte() % len(options)]

    def some(self, options, least: int = 1, most: int = 3) -> list:
        return [self.pick(options) for _ in range(least + self.byte() % (most - least + 1))]


def _source(g: Genome) -> dict:
    fields = {"principals": PRINCIPALS, "notPrincipals": PRINCIPALS, "namespaces": NAMESPACE_PATTERNS,
              "notNamespaces": NAMESPACE_PATTERNS}
    item = {name: g.some(options) for name, options in fields.items() if g.byte() % 3 == 0}
    item = item or {"principals": g.some(PRINCIPALS)}
    return {"source": item} if g.byte() % 2 else item


def _operation(g: Genome) -> dict:
    item = {name: g.some(PORTS) for name in ("ports", "notPorts") if g.byte() % 3 == 0} or {"ports": g.some(PORTS)}
    return {"operation": item} if g.byte() % 2 else item


def _rule(g: Genome) -> dict:
    choice = g.byte() % 4
    rule = {}
    if choice in (1, 3):
        rule["from"] = [_source(g) for _ in range(1 + g.byte() % 2)]
    if choice in (2, 3):
        rule["to"] = [_operation(g) for _ in range(1 + g.byte() % 2)]
    return rule


def valid_document(g: Genome) -> dict:
    kind = g.pick(["AuthorizationPolicy"] * 3 + ["PeerAuthentication"])
    doc = {"apiVersion": "security.istio.io/v1", "kind": kind,
           "metadata": {"name": g.pick(NAMES), "namespace": g.pick(NAMESPACES)}}
    spec: dict = {}
    if g.byte() % 3:
        spec["selector"] = {"workload": g.pick(WORKLOADS)}
    if kind == "PeerAuthentication":
        spec["mtls"] = {"mode": g.pick(MODES)}
    else:
        spec["action"] = g.pick(ACTIONS)
        if g.byte() % 4 == 0:
            spec["dryRun"] = g.pick([True, False])
        spec["rules"] = [_rule(g) for _ in range(g.byte() % 4)]
    doc["spec"] = spec
    return doc


# -- near misses: (name, applies to the document?, break it in place; returns the field it broke) ------
def _first_list(doc: dict, field: str) -> list | None:
    for rule in doc["spec"].get("rules", []):
        for item in rule.get("from", []) + rule.get("to", []):
            inner = item.get("source") or item.get("operation") or item
            if field in inner:
                return inner[field]
    return None


def _set_port(doc):
    _first_list(doc, "ports").append(70123)
    return "ports"


def _set_pattern(doc):
    _first_list(doc, "principals").append("spiffe://td/*/sa/zz")
    return "principals"


MUTATIONS = {
    "port out of range": (lambda d: _first_list(d, "ports") is not None, _set_port),
    "'*' inside a pattern": (lambda d: _first_list(d, "principals") is not None, _set_pattern),
    "action in lower case": (lambda d: "action" in d["spec"], lambda d: d["spec"].update(action="Deny") or "action"),
    "mtls mode in lower case": (lambda d: "mtls" in d["spec"],
                                lambda d: d["spec"]["mtls"].update(mode="strict") or "mode"),
    "name with an underscore": (lambda d: True, lambda d: d["metadata"].update(name="Orders_DB") or "name"),
    "namespace in upper case": (lambda d: True, lambda d: d["metadata"].update(namespace="Shop") or "namespace"),
    "unknown spec field": (lambda d: True, lambda d: d["spec"].update(bogusField="x") or "bogusField"),
    "kind misspelt": (lambda d: True, lambda d: d.update(kind="AuthorizationPolicies") or "kind"),
    "dryRun as a word": (lambda d: "action" in d["spec"], lambda d: d["spec"].update(dryRun="sure") or "dryRun"),
    "empty selector": (lambda d: "selector" in d["spec"],
                       lambda d: d["spec"]["selector"].update(workload="") or "workload"),
}


def document_from(data: bytes) -> tuple[dict, str | None]:
    """A valid document, broken in one place for about one in four: (document, the broken field or None)."""
    g = Genome(data)
    doc = valid_document(g)
    if g.byte() % 4:
        return doc, None
    candidates = [name for name, (applies, _) in MUTATIONS.items() if applies(doc)]
    return doc, MUTATIONS[g.pick(candidates)][1](doc)


def with_lines(value, line: int = 1):
    """What the loader's YAML constructor builds: mappings that know their line (agent.policy.loader)."""
    if isinstance(value, dict):
        mapping = _LineDict({k: with_lines(v, line + 1) for k, v in value.items()})
        mapping.line, mapping.key_lines = line, {k: line for k in value}
        return mapping
    if isinstance(value, list):
        return [with_lines(v, line + 1) for v in value]
    return value


REQUESTS = [engine.Request(f"spiffe://td/ns/{ns}/sa/{sa}", ns, workload, dst_ns, port)
            for ns, sa in (("shop", "web"), ("billing", "x"), ("data", "db"))
            for workload in WORKLOADS for dst_ns in NAMESPACES for port in (80, 5432, 6379)] + \
           [engine.Request(None, None, "web", "shop", 80)]
UNSELECTED = engine.Request("spiffe://td/ns/shop/sa/web", "shop", "nobody", "unselected", 80)


def allow_everything_like(policy: AuthorizationPolicy) -> AuthorizationPolicy:
    spec = {"action": "ALLOW", "rules": [{}]}
    if policy.workload is not None:
        spec["selector"] = {"workload": policy.workload}
    doc = {"kind": "AuthorizationPolicy", "metadata": {"name": "allow-all", "namespace": policy.namespace}, "spec": spec}
    return parse_document(with_lines(doc), "extra.yaml")


def check_policy(policy) -> int:
    """The properties of one accepted policy; returns how many requests a DENY policy denied."""
    assert policy.name and policy.namespace and policy.key.count("/") == 1
    if isinstance(policy, PeerAuthentication):
        assert isinstance(policy.mode, MtlsMode)
        mode = engine.mtls_mode(PolicySet(peer_authentication=(policy,)), "unselected", "nobody")
        assert mode is (policy.mode if policy.namespace == ROOT and policy.workload is None else MtlsMode.PERMISSIVE)
        return 0
    assert isinstance(policy, AuthorizationPolicy)
    for rule in policy.rules:
        for operation in rule.operations or ():
            assert all(type(p) is int and 1 <= p <= 65535 for p in operation.ports + operation.not_ports)
    alone = PolicySet(authorization=(policy,))
    selects_unselected = policy.namespace == ROOT and policy.workload is None
    for default_allow in (True, False):
        decision = engine.decide(alone, UNSELECTED, default_allow=default_allow)
        if not selects_unselected:  # nothing selects this workload: the default action, no policy named
            assert decision.allowed is default_allow and decision.policy is None, decision
    denied = 0
    if policy.action is not Action.DENY or policy.dry_run:
        return 0
    with_allow = PolicySet(authorization=(policy, allow_everything_like(policy)))
    for request in REQUESTS:
        decision = engine.decide(alone, request, default_allow=True)
        if decision.allowed:
            continue
        denied += 1
        assert decision.policy == policy.key, decision
        for default_allow in (True, False):  # a matching DENY denies whatever else allows
            assert engine.decide(with_allow, request, default_allow=default_allow).policy == policy.key
            assert not engine.decide(with_allow, request, default_allow=default_allow).allowed
    return denied


def parse_generated(data: bytes) -> tuple[object | None, str | None]:
    doc, broken = document_from(data)
    try:
        policy = parse_document(with_lines(doc), "fuzz.yaml")
    except PolicyError as exc:
        assert broken is not None, f"a valid document was refused: {exc}\n{doc}"
        assert exc.file == "fuzz.yaml" and str(exc).startswith("fuzz.yaml:")
        assert exc.field.split(".")[-1].split("[")[0] == broken or broken in str(exc), (broken, str(exc))
        return None, broken
    assert broken is None, f"a document with a broken {broken} was accepted: {doc}"
    return policy, None


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=8, max_size=120))
def test_documents_are_accepted_or_refused_naming_the_broken_field(data):
    policy, _ = parse_generated(data)
    if policy is not None:
        check_policy(policy)


def yaml_text(doc: dict) -> str:
    return yaml.safe_dump(doc, default_flow_style=None, sort_keys=False, width=1000)


MARKERS = {"ports": "70123", "principals": "spiffe://td/*/sa/zz", "action": "action: Deny", "mode": "mode: strict",
           "name": "Orders_DB", "namespace": "namespace: Shop", "bogusField": "bogusField:",
           "kind": "AuthorizationPolicies", "dryRun": "dryRun: sure", "workload": "workload: ''"}


@settings(max_examples=400, **FUZZ)  # a YAML dump and load each: ~20 ms
@given(st.binary(min_size=8, max_size=120), st.integers(0, 3))
def test_in_a_file_the_error_points_at_the_line_of_the_broken_field(tmp_path_factory, data, leading_documents):
    doc, broken = document_from(data)
    others = [valid_document(Genome(bytes([i, 7, 3]))) for i in range(leading_documents)]
    for i, other in enumerate(others):
        other["metadata"]["name"] = f"other-{i}"  # unique names: only the broken field is wrong
    text = "---\n".join(yaml_text(d) for d in others + [doc])
    path = tmp_path_factory.getbasetemp() / "fuzz-policy.yaml"
    path.write_text(text)
    if broken is None:
        assert len(load_file(path)) == leading_documents + 1
        return
    marker = MARKERS[broken]
    (line,) = [i + 1 for i, l in enumerate(text.splitlines()) if marker in l]
    try:
        load_file(path)
    except PolicyError as exc:
        assert exc.line == line, f"{exc} — the broken {broken} is on line {line}:\n{text}"
    else:
        raise AssertionError(f"accepted a file with a broken {broken}:\n{text}")


YAML_TOKENS = ["- ", ": ", "{", "}", "[", "]", "'", '"', "&x ", "*x ", "!!binary aGk=", "!!python/name:os.system",
               "? ", "\t", "#", ".nan", "~", "\n", "é", "<<: *x\n", "\x00", "...\n", "%YAML 1.1\n", "---\n"]


@settings(max_examples=600, **FUZZ)
@given(st.binary(min_size=8, max_size=120), st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(YAML_TOKENS)),
                                                      max_size=2))
def test_a_valid_file_with_a_stray_token_is_refused_with_a_policy_error_or_loaded(tmp_path_factory, data, edits):
    text = yaml_text(valid_document(Genome(data)))
    for position, token in edits:
        at = position % (len(text) + 1)
        text = text[:at] + token + text[at:]
    path = tmp_path_factory.getbasetemp() / "fuzz-policy-tokens.yaml"
    path.write_text(text)
    try:
        policies = load_file(path)
    except PolicyError as exc:
        assert exc.file == str(path) and 0 <= exc.line <= text.count("\n") + 1
        return
    for policy in policies:
        check_policy(policy)


def test_the_generators_mostly_build_valid_policies():
    """Seeded: the share of generated documents accepted, every kind of break reached, and the DENY
    property not vacuous."""
    rng = random.Random(21)
    accepted = denied = 0
    broken_fields: set[str] = set()
    for _ in range(2_000):
        policy, broken = parse_generated(rng.randbytes(rng.randint(8, 120)))
        if policy is None:
            broken_fields.add(broken)
        else:
            accepted += 1
            denied += check_policy(policy)
    assert accepted >= 0.65 * 2_000, accepted  # about 3 in 4 by construction
    assert broken_fields == set(MARKERS), set(MARKERS) - broken_fields
    assert denied >= 200, denied  # DENY policies really matched requests
