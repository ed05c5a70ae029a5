"""Policy files: the documented format loads; every mistake names file, line and field."""

import textwrap

import pytest

from agent.policy.loader import PolicyError, load_file, load_paths
from agent.policy.model import Action, MtlsMode

GOOD = """\
kind: AuthorizationPolicy
metadata: {name: orders-db, namespace: data}
spec:
  selector: {workload: postgres}
  action: ALLOW
  dryRun: false
  rules:
    - from: [{principals: ["spiffe://td/ns/shop/sa/orders"]}, {namespaces: ["billing"]}]
      to:   [{ports: [5432]}]
---
kind: PeerAuthentication
metadata: {name: strict-db, namespace: data}
spec:
  selector: {workload: postgres}
  mtls: {mode: STRICT}
"""


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_documented_example_loads(tmp_path):
    policies = load_paths([write(tmp_path, GOOD)])
    (authz,) = policies.authorization
    assert (authz.key, authz.action, authz.workload) == ("data/orders-db", Action.ALLOW, "postgres")
    assert authz.rules[0].sources[1].namespaces == ("billing",)
    assert authz.rules[0].operations[0].ports == (5432,)
    assert policies.peer_authentication[0].mode is MtlsMode.STRICT


def test_istio_nested_source_form_is_accepted(tmp_path):
    text = GOOD.replace('{principals: ["spiffe://td/ns/shop/sa/orders"]}',
                        '{source: {principals: ["spiffe://td/ns/shop/sa/orders"]}}')
    assert load_paths([write(tmp_path, text)]).authorization[0].rules[0].sources[0].principals


@pytest.mark.parametrize("old, new, line, field", [
    ("action: ALLOW", "action: PERMIT", 5, "spec.action"),
    ("dryRun: false", "dryRun: maybe", 6, "spec.dryRun"),
    ("to:   [{ports: [5432]}]", "to:   [{ports: [99999]}]", 9, "spec.rules[0].to[0].ports"),
    ('{namespaces: ["billing"]}', '{namespace: ["billing"]}', 8, "spec.rules[0].from[1].namespace"),
    ('"spiffe://td/ns/shop/sa/orders"', '"orders"', 8, "spec.rules[0].from[0].principals"),
    ("kind: AuthorizationPolicy", "kind: AuthPolicy", 1, "kind"),
    ("metadata: {name: orders-db, namespace: data}", "metadata: {name: orders-db}", 2, "metadata.namespace"),
    ("mtls: {mode: STRICT}", "mtls: {mode: STRICTEST}", 15, "spec.mtls.mode"),
])
def test_errors_name_file_line_and_field(tmp_path, old, new, line, field):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(PolicyError) as info:
        load_file(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), line, field)
    assert f"{path}:{line}: {field}:" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "kind: AuthorizationPolicy\nmetadata: {name: x\n")
    with pytest.raises(PolicyError, match="not valid YAML") as info:
        load_file(path)
    assert info.value.line >= 2


def test_duplicate_names_across_files_are_refused(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(PolicyError, match="also defined at"):
        load_paths([tmp_path])


