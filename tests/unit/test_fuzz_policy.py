"""Fuzzing the policy loader (agent/policy/loader.py) with Hypothesis: 10,000 policy documents built
from the real vocabulary (kinds, metadata, selectors, actions, rules with from/to in both the flat
and Istio's nested form, patterns, ports) with wrong types and values mixed in, and 2,000 YAML texts
through ``load_file``.

The loader may refuse (PolicyError naming file, line and field) but never raise anything else; a
policy it accepts is well-formed, and the engine decides on it without error.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.policy import engine
from agent.policy.loader import PolicyError, _LineDict, load_file, parse_document
from agent.policy.model import AuthorizationPolicy, MtlsMode, PeerAuthentication, PolicySet

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WORDS = ["web", "data", "tcpmesh-system", "", "a" * 70, "UPPER", "x_y", "ns/evil", "*", None, 3, True, [], {}]
NAMES = ["web", "data", "orders-db", "a.b", "tcpmesh-system"] * 10 + WORDS  # mostly valid, to get to the rules
PATTERNS = ["*", "spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/*", "*/sa/web", "web", "a*b", "**", "", 7,
            None, "spiffe://*", "*spiffe", "shop", "billing", "x*"]
PORTS = [80, 5432, "6379", 0, 65535, 65536, -1, "http", True, None, 1.5, "08", [80]]
ACTIONS = ["ALLOW", "DENY", "AUDIT", "allow", "", None, 1]
MODES = ["STRICT", "PERMISSIVE", "strict", "", None, 0]


class Genome:
    """Reads choices off bytes (Hypothesis's cheapest input); past the end every choice is 1, which
    document_from treats as the ordinary case (a field present, a value from the start of a list)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 1

    def pick(self, options):
        return options[self.byte() % len(options)]

    def some(self, options, most: int = 3) -> list:
        return [self.pick(options) for _ in range(self.byte() % (most + 1))]


def _source(g: Genome):
    fields = ("principals", "notPrincipals", "namespaces", "notNamespaces")
    item = {name: g.some(PATTERNS) for name in fields if g.byte() % 3}
    if g.byte() % 16 == 0:
        item["ipBlocks"] = ["10.0.0.0/8"]  # an Istio field tcpmesh does not have
    return {"source": item} if g.byte() % 2 else item


def _operation(g: Genome):
    item = {name: g.some(PORTS) if g.byte() % 5 else g.pick(PORTS)
            for name in ("ports", "notPorts") if g.byte() % 2}
    return {"operation": item} if g.byte() % 2 else item


def _rule(g: Genome):
    choice = g.byte() % 8
    if choice == 0:
        return g.pick(WORDS)  # not a mapping
    rule = {}
    if choice & 1:
        rule["from"] = [_source(g) for _ in range(g.byte() % 3)] if g.byte() % 6 else g.pick(WORDS)
    if choice & 2:
        rule["to"] = [_operation(g) for _ in range(g.byte() % 3)] if g.byte() % 6 else g.pick(WORDS)
    if choice == 7 and g.byte() % 4 == 0:
        rule["when"] = "unsupported"
    return rule


def document_from(data: bytes):
    g = Genome(data)
    kind = g.pick(["AuthorizationPolicy"] * 20 + ["PeerAuthentication"] * 8 + ["Policy", None, 5])
    doc = {"apiVersion": "security.istio.io/v1", "kind": kind}
    if g.byte() % 32:
        doc["metadata"] = {"name": g.pick(NAMES), "namespace": g.pick(NAMES)} if g.byte() % 32 else g.pick(WORDS)
    spec: dict = {}
    if g.byte() % 3:
        spec["selector"] = {"workload": g.pick(NAMES)} if g.byte() % 16 else g.pick(WORDS)
    if kind == "PeerAuthentication" or g.byte() % 7 == 0:
        spec["mtls"] = {"mode": g.pick(MODES)} if g.byte() % 6 else g.pick(WORDS)
    else:
        if g.byte() % 2:
            spec["action"] = g.pick(ACTIONS)
        if g.byte() % 4 == 0:
            spec["dryRun"] = g.pick([True, False, "yes", 1, None])
        if g.byte() % 5:
            spec["rules"] = [_rule(g) for _ in range(g.byte() % 4)] if g.byte() % 8 else g.pick(WORDS)
    if g.byte() % 6:
        doc["spec"] = spec
    if g.byte() % 64 == 0:
        doc["status"] = {}
    return doc


def with_lines(value, line: int = 1):
    """What the loader's YAML constructor builds: mappings that know their line (agent.policy.loader)."""
    if isinstance(value, dict):
        mapping = _LineDict({k: with_lines(v, line + 1) for k, v in value.items()})
        mapping.line, mapping.key_lines = line, {k: line for k in value}
        return mapping
    if isinstance(value, list):
        return [with_lines(v, line + 1) for v in value]
    return value


REQUESTS = [engine.Request("spiffe://td/ns/shop/sa/web", "shop", "web", "data", 5432),
            engine.Request(None, None, "web", "tcpmesh-system", 80),
            engine.Request("spiffe://td/ns/billing/sa/x", "billing", "web", "web", 6379)]


def assert_usable(policy) -> None:
    """An accepted policy is well-formed and the engine decides with it."""
    assert policy.name and policy.namespace and policy.key.count("/") == 1
    if isinstance(policy, PeerAuthentication):
        assert isinstance(policy.mode, MtlsMode)
        policies = PolicySet(peer_authentication=(policy,))
        for request in REQUESTS:
            assert isinstance(engine.mtls_mode(policies, request.destination_namespace,
                                               request.destination_workload), MtlsMode)
        return
    assert isinstance(policy, AuthorizationPolicy)
    for rule in policy.rules:
        for operation in rule.operations or ():
            assert all(type(p) is int and 1 <= p <= 65535 for p in operation.ports + operation.not_ports)
        for source in rule.sources or ():
            for pattern in source.principals + source.not_principals + source.namespaces + source.not_namespaces:
                assert isinstance(pattern, str) and pattern and pattern.count("*") <= 1
    policies = PolicySet(authorization=(policy,))
    for request in REQUESTS:
        for default_allow in (True, False):
            decision = engine.decide(policies, request, default_allow=default_allow)
            assert isinstance(decision.allowed, bool) and decision.reason


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=24, max_size=160))
def test_documents_are_refused_with_file_line_and_field_or_decided_on(data):
    try:
        policy = parse_document(with_lines(document_from(data)), "fuzz.yaml")
    except PolicyError as exc:
        assert exc.file == "fuzz.yaml" and exc.field and str(exc).startswith("fuzz.yaml:")
        return
    assert_usable(policy)


YAML_TOKENS = ["kind: AuthorizationPolicy\n", "kind: PeerAuthentication\n", "metadata: {name: a, namespace: b}\n",
               "spec:\n", "  rules:\n", "  - from: [{principals: ['*']}]\n", "    to: [{ports: [80]}]\n",
               "  mtls: {mode: STRICT}\n", "  action: DENY\n", "---\n", "- ", ": ", "{", "}", "[", "]", "'", '"',
               "&x ", "*x ", "!!binary aGk=", "!!python/name:os.system", "? ", "\t", "#", ".nan", "~", "\n", "é",
               "<<: *x\n", "\x00", "  selector: {workload: w}\n", "...\n", "%YAML 1.1\n"]


@settings(max_examples=2_000, **FUZZ)
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=25))
def test_policy_files_are_refused_with_a_policy_error_or_loaded(tmp_path_factory, tokens):
    path = tmp_path_factory.getbasetemp() / "fuzz-policy.yaml"
    path.write_text("".join(tokens))
    try:
        policies = load_file(path)
    except PolicyError as exc:
        assert exc.file == str(path)
        return
    for policy in policies:
        assert_usable(policy)
