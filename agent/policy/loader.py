"""Policy files (YAML, several documents per file) → a validated ``PolicySet``.

Every error names the file, the line and the field, and says how to fix it; one bad document makes
the whole load fail (the caller keeps the previous set: nothing is half-applied). ``check_paths``
(`tcpmesh policy check`) goes on after an error and returns every one: each file, each document,
each rule and each of its sources and operations is checked on its own. Reads files only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agent.errors import TcpmeshError
from agent.identity.spiffe import SpiffeIdError, validate_namespace
from agent.policy.model import (Action, AuthorizationPolicy, MtlsMode, Operation, Origin, PeerAuthentication,
                                PolicySet, Rule, Source)

KINDS = ("AuthorizationPolicy", "PeerAuthentication")
_OBJECT_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # a DNS-1123 subdomain
POLICY_SUFFIXES = (".yaml", ".yml")


class PolicyError(TcpmeshError):
    def __init__(self, file: str, line: int, field: str, problem: str) -> None:
        self.file, self.line, self.field, self.problem = file, line, field, problem
        super().__init__(f"{file}:{line}: {field}: {problem}")


class _LineDict(dict):
    """A mapping that remembers the line of itself and of each key."""

    line = 0
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):  # noqa: D401 (yaml API)
        mapping = _LineDict(super().construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
        return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)


class _Reader:
    """Typed field access on one document, raising PolicyError with file/line/field. With an error
    list, ``each`` checks independent parts (rules, sources, operations) one by one."""

    def __init__(self, file: str, errors: list[PolicyError] | None = None) -> None:
        self.file = file
        self.errors = errors

    def report(self, error: PolicyError) -> None:
        """Raise ``error``, or collect it and let the caller go on with a placeholder value."""
        if self.errors is None:
            raise error
        self.errors.append(error)

    def each(self, parse):
        """``parse()``, or None with its error collected (raised when not collecting)."""
        if self.errors is None:
            return parse()
        try:
            return parse()
        except PolicyError as exc:
            self.errors.append(exc)
            return None

    def fail(self, mapping: Any, field: str, problem: str, key: str | None = None) -> PolicyError:
        line = getattr(mapping, "key_lines", {}).get(key, getattr(mapping, "line", 0)) if key else getattr(mapping, "line", 0)
        return PolicyError(self.file, line, field, problem)

    def mapping(self, parent: Any, key: str, field: str, required: bool = False) -> Any:
        value = parent.get(key) if isinstance(parent, dict) else None
        if value is None:
            if required:
                raise self.fail(parent, field, "is required")
            return None
        if not isinstance(value, dict):
            raise self.fail(parent, field, f"must be a mapping, got {type(value).__name__}", key)
        return value

    def string(self, parent: Any, key: str, field: str, required: bool = False) -> str | None:
        value = parent.get(key)
        if value is None:
            if required:
                raise self.fail(parent, field, "is required")
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(parent, field, f"must be a non-empty string, got {value!r}", key)
        return value

    def strings(self, parent: Any, key: str, field: str) -> tuple[str, ...]:
        value = parent.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(parent, field, "must be a list of non-empty strings", key)
        for pattern in value:
            if "*" in pattern[1:-1] or pattern.count("*") > 1:
                raise self.fail(parent, field, f"pattern {pattern!r}: '*' may only be the whole value, "
                                               "a prefix (*x) or a suffix (x*)", key)
        return tuple(value)

    def ports(self, parent: Any, key: str, field: str) -> tuple[int, ...]:
        value = parent.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(parent, field, "must be a list of ports", key)
        ports = []
        for port in value:
            if isinstance(port, str) and port.isdigit():
                port = int(port)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise self.fail(parent, field, f"{port!r} is not a TCP port (1-65535)", key)
            ports.append(port)
        return tuple(ports)

    def only_keys(self, mapping: Any, allowed: tuple[str, ...], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.fail(mapping, f"{where}.{key}" if where else key,
                                f"unknown field; allowed: {', '.join(allowed)}", key)


def load_paths(paths: list[str | Path]) -> PolicySet:
    """Load files and directories (their *.yaml/*.yml, sorted) into one PolicySet; the first error raised."""
    policies, errors = check_paths(paths)
    if errors:
        raise errors[0]
    return policies


def check_paths(paths: list[str | Path]) -> tuple[PolicySet, list[PolicyError]]:
    """Every valid object of the files and directories, and every error (in file and line order)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            try:
                files += sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
            except OSError as exc:
                raise PolicyError(str(path), 0, "<directory>", f"cannot read: {exc.strerror}") from exc
        else:
            files.append(path)
    authz: list[AuthorizationPolicy] = []
    peer: list[PeerAuthentication] = []
    errors: list[PolicyError] = []
    for file in files:
        for obj in _load_file(file, errors):
            (authz if isinstance(obj, AuthorizationPolicy) else peer).append(obj)
    errors += _unique([p.key for p in authz], "AuthorizationPolicy", authz)
    errors += _unique([p.key for p in peer], "PeerAuthentication", peer)
    return PolicySet(tuple(authz), tuple(peer), tuple(str(f) for f in files)), errors


def _unique(keys: list[str], kind: str, objects: list) -> list[PolicyError]:
    seen: dict[str, Any] = {}
    errors = []
    for key, obj in zip(keys, objects):
        if key in seen:
            first = seen[key].origin
            errors.append(PolicyError(obj.origin.file, obj.origin.line, "metadata.name",
                                      f"{kind} {key} is also defined at {first.file}:{first.line}; names must be unique"))
        else:
            seen[key] = obj
    return errors


def load_file(file: str | Path) -> list[AuthorizationPolicy | PeerAuthentication]:
    """One file's objects; its first error raised."""
    errors: list[PolicyError] = []
    objects = _load_file(file, errors)
    if errors:
        raise errors[0]
    return objects


def _load_file(file: str | Path, errors: list[PolicyError]) -> list[AuthorizationPolicy | PeerAuthentication]:
    """The file's valid objects; each invalid document's errors appended to ``errors``."""
    name = str(file)
    try:
        text = Path(file).read_text()
    except OSError as exc:
        errors.append(PolicyError(name, 0, "<file>", f"cannot read: {exc.strerror}"))
        return []
    try:
        documents = list(yaml.load_all(text, Loader=_LineLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        errors.append(PolicyError(name, (mark.line + 1) if mark else 0, "<yaml>",
                                  f"not valid YAML: {getattr(exc, 'problem', exc)}"))
        return []
    objects = []
    for doc in documents:
        if doc is None:
            continue
        found: list[PolicyError] = []
        try:
            obj = parse_document(doc, name, found)
        except PolicyError as exc:
            found.append(exc)
        if found:
            errors += sorted(found, key=lambda e: e.line)
        else:
            objects.append(obj)
    return objects


def parse_document(doc: Any, file: str, errors: list[PolicyError] | None = None) -> AuthorizationPolicy | PeerAuthentication:
    """One document as a policy object. With ``errors``, an invalid rule (or source, or operation) is
    appended there and the rest is still checked; the object returned is then incomplete — use it
    only when ``errors`` stayed empty."""
    r = _Reader(file, errors)
    if not isinstance(doc, dict):
        raise PolicyError(file, 0, "<document>", "a policy document must be a mapping with kind, metadata, spec")
    r.only_keys(doc, ("apiVersion", "kind", "metadata", "spec"), "")
    kind = r.string(doc, "kind", "kind", required=True)
    if kind not in KINDS:
        raise r.fail(doc, "kind", f"unknown kind {kind!r}; use {' or '.join(KINDS)}", "kind")
    metadata = r.mapping(doc, "metadata", "metadata", required=True)
    r.only_keys(metadata, ("name", "namespace"), "metadata")
    name = r.string(metadata, "name", "metadata.name", required=True)
    if not _OBJECT_NAME.fullmatch(name):  # keys are "<namespace>/<name>" and reasons "policy <key>: ..."
        raise r.fail(metadata, "metadata.name", f"{name!r} is not an object name: lowercase letters, digits, '-' "
                                                "and '.', starting and ending with a letter or digit, at most 253 "
                                                "characters (as in Kubernetes)", "name")
    namespace = r.string(metadata, "namespace", "metadata.namespace", required=True)
    try:
        validate_namespace(namespace)
    except SpiffeIdError as exc:
        raise r.fail(metadata, "metadata.namespace", str(exc), "namespace") from exc
    spec = r.mapping(doc, "spec", "spec") or _LineDict()
    workload = _selector(r, spec)
    origin = Origin(file, doc.line)
    if kind == "PeerAuthentication":
        r.only_keys(spec, ("selector", "mtls"), "spec")
        mtls = r.mapping(spec, "mtls", "spec.mtls", required=True)
        r.only_keys(mtls, ("mode",), "spec.mtls")
        mode = r.string(mtls, "mode", "spec.mtls.mode", required=True)
        if mode not in MtlsMode.__members__:
            raise r.fail(mtls, "spec.mtls.mode", f"{mode!r} is not STRICT or PERMISSIVE", "mode")
        return PeerAuthentication(name, namespace, MtlsMode[mode], workload, origin)
    r.only_keys(spec, ("selector", "action", "dryRun", "rules"), "spec")
    action = spec.get("action", "ALLOW")
    if action not in Action.__members__:
        r.report(r.fail(spec, "spec.action", f"{action!r} is not ALLOW, DENY or AUDIT", "action"))
        action = "ALLOW"  # a placeholder: the object is dropped, its rules are still checked
    dry_run = spec.get("dryRun", False)
    if not isinstance(dry_run, bool):
        r.report(r.fail(spec, "spec.dryRun", f"must be true or false, got {dry_run!r}", "dryRun"))
    rules_raw = spec.get("rules", [])
    if not isinstance(rules_raw, list):
        raise r.fail(spec, "spec.rules", "must be a list of rules", "rules")
    rules = tuple(rule for rule in (r.each(lambda: _rule(r, rule, f"spec.rules[{i}]", spec))
                                    for i, rule in enumerate(rules_raw)) if rule is not None)
    return AuthorizationPolicy(name, namespace, Action[action], workload, rules, dry_run, origin)


def _selector(r: _Reader, spec: Any) -> str | None:
    selector = r.mapping(spec, "selector", "spec.selector")
    if selector is None:
        return None
    r.only_keys(selector, ("workload",), "spec.selector")
    return r.string(selector, "workload", "spec.selector.workload", required=True)


def _rule(r: _Reader, rule: Any, where: str, parent: Any) -> Rule:
    if rule is None:
        rule = _LineDict()
    if not isinstance(rule, dict):
        raise r.fail(parent, where, "a rule must be a mapping with from and/or to", "rules")
    r.only_keys(rule, ("from", "to"), where)
    sources = _list_of(r, rule, "from", f"{where}.from", lambda m, w: _source(r, m, w))
    operations = _list_of(r, rule, "to", f"{where}.to", lambda m, w: _operation(r, m, w))
    return Rule(sources, operations)


def _list_of(r: _Reader, rule: Any, key: str, where: str, parse) -> tuple | None:
    value = rule.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise r.fail(rule, where, "must be a non-empty list", key)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise r.fail(rule, f"{where}[{i}]", "must be a mapping", key)
        # accept both Istio's {source: {...}} / {operation: {...}} and the flat form
        inner_key = "source" if key == "from" else "operation"
        if set(item) == {inner_key}:
            item = r.mapping(item, inner_key, f"{where}[{i}].{inner_key}", required=True)
        parsed = r.each(lambda: parse(item, f"{where}[{i}]"))
        if parsed is not None:
            out.append(parsed)
    return tuple(out)


def _source(r: _Reader, m: Any, where: str) -> Source:
    r.only_keys(m, ("principals", "notPrincipals", "namespaces", "notNamespaces"), where)
    source = Source(r.strings(m, "principals", f"{where}.principals"),
                    r.strings(m, "notPrincipals", f"{where}.notPrincipals"),
                    r.strings(m, "namespaces", f"{where}.namespaces"),
                    r.strings(m, "notNamespaces", f"{where}.notNamespaces"))
    for principal in source.principals + source.not_principals:
        if principal != "*" and not principal.startswith(("spiffe://", "*")):
            raise r.fail(m, f"{where}.principals", f"{principal!r} is not a SPIFFE ID pattern "
                                                   "(spiffe://<td>/ns/<ns>/sa/<sa>, '*', or a prefix/suffix with '*')",
                         "principals" if principal in source.principals else "notPrincipals")
    return source


def _operation(r: _Reader, m: Any, where: str) -> Operation:
    r.only_keys(m, ("ports", "notPorts"), where)
    return Operation(r.ports(m, "ports", f"{where}.ports"), r.ports(m, "notPorts", f"{where}.notPorts"))
