"""The CLI reports operator errors in one line with exit code 2, naming what is wrong and the fix."""

import yaml
from click.testing import CliRunner

from agent.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "ca", "lab", "demo"):
        assert command in result.output


def test_run_with_an_invalid_config_names_the_field(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"node": {"name": "n1", "address": "10.0.0.1"},
                                      "capture": {"redirect_address": "10.0.0.1"},
                                      "proxy": {"inbound_port": 15001}}))
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "proxy.outbound_port" in result.output and "must differ" in result.output
    assert "Traceback" not in result.output


def test_run_with_a_missing_config_says_how_to_fix(tmp_path):
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read the config file" in result.output and "--config" in result.output


def test_ca_init_creates_a_root_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    first = runner.invoke(main, ["ca", "init", "--trust-domain", "example.org", "--out", str(tmp_path / "ca")])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    second = runner.invoke(main, ["ca", "init", "--trust-domain", "example.org", "--out", str(tmp_path / "ca")])
    assert second.exit_code == 2 and "--force" in second.output


POLICY = """\
kind: AuthorizationPolicy
metadata: {name: orders-db, namespace: data}
spec:
  selector: {workload: postgres}
  rules:
    - from: [{principals: ["spiffe://td/ns/shop/sa/orders"]}]
      to: [{ports: [5432]}]
"""


def test_policy_check_accepts_good_files_and_names_the_broken_field(tmp_path):
    (tmp_path / "good.yaml").write_text(POLICY)
    ok = CliRunner().invoke(main, ["policy", "check", str(tmp_path / "good.yaml")])
    assert ok.exit_code == 0 and "data/orders-db" in ok.output
    (tmp_path / "bad.yaml").write_text(POLICY.replace("5432", "70000"))
    bad = CliRunner().invoke(main, ["policy", "check", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2
    assert f"{tmp_path / 'bad.yaml'}:7: spec.rules[0].to[0].ports" in bad.output


def test_policy_explain_names_the_deciding_policy_and_rule(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    args = ["policy", "explain", "--dir", str(tmp_path), "--to", "data/postgres", "--port", "5432"]
    allowed = CliRunner().invoke(main, args + ["--from", "spiffe://td/ns/shop/sa/orders"])
    assert allowed.exit_code == 0 and allowed.output.startswith("ALLOW") and "rule 0" in allowed.output
    denied = CliRunner().invoke(main, args + ["--from", "spiffe://td/ns/dev/sa/laptop"])
    assert denied.output.startswith("DENY") and "data/orders-db" in denied.output
    other = CliRunner().invoke(main, ["policy", "explain", "--dir", str(tmp_path), "--to", "data/redis", "--port", "6379",
                                      "--from", "plaintext", "--default-action", "DENY"])
    assert other.output.startswith("DENY") and "default_action" in other.output


def test_denied_reason_carries_the_policy_name():
    from agent.proxy.header import Status, decode_status_body

    named = decode_status_body(bytes([Status.DENIED]) + b"policy data/orders-db: no rule of the ALLOW policies ... matches")
    assert (named.policy, named.reason) == ("data/orders-db", "no rule of the ALLOW policies ... matches")
    assert decode_status_body(bytes([Status.DENIED]) + b"denied by default_action: no policy selects data/x").policy == ""


def test_policy_check_reports_every_error_not_only_the_first(tmp_path):
    (tmp_path / "a.yaml").write_text(POLICY.replace("5432", "70000").replace(
        'principals: ["spiffe://td/ns/shop/sa/orders"]', 'principals: ["orders"]') + "---\n" + POLICY.replace(
        "orders-db", "second").replace("action", "x") + "  action: DENNY\n")
    (tmp_path / "b.yaml").write_text("kind: AuthorizationPolicy\nmetadata: {name: orders-db, namespace: data}\n"
                                     "spec: {rules: [{to: [{ports: [0]}]}, {frm: []}]}\n")
    (tmp_path / "c.yaml").write_text(POLICY.replace("orders-db", "fine"))
    result = CliRunner().invoke(main, ["policy", "check", str(tmp_path)])
    assert result.exit_code == 2
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for line in (f"{a}:6: spec.rules[0].from[0].principals: 'orders' is not a SPIFFE ID pattern",
                 f"{a}:7: spec.rules[0].to[0].ports: 70000 is not a TCP port (1-65535)",
                 f"{a}:16: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT",
                 f"{b}:3: spec.rules[0].to[0].ports: 0 is not a TCP port (1-65535)",
                 f"{b}:3: spec.rules[1].frm: unknown field; allowed: from, to",
                 "5 error(s) in 2 file(s)"):
        assert line in result.output, result.output
    assert "ok  AuthorizationPolicy data/fine" in result.output
