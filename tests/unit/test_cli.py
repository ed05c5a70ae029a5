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
