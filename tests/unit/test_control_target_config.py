"""`--config FILE` names the agent to ask by its admin.socket (agent/control/target.py) even when the file holds
a bad edit: `tcpmesh identity reload` (the unit's ExecReload) must reach the running agent, whose refusal
names the file, the field and the fix — before, the command stopped at the file's own error and never
named the file or said that nothing changed (seen under `systemctl reload` in the vm tier)."""

from __future__ import annotations

import pytest

from agent.config import DEFAULT_ADMIN_SOCKET
from agent.control.target import resolve_socket
from agent.errors import ConfigError

VALID = """trust_domain: td.test
node: {name: node1, address: 10.0.0.1}
identity: {mode: %s, issuer: {addresses: ["10.0.0.5:15012"]}}
capture: {redirect_address: 10.0.0.1}
admin: {socket: /run/elsewhere/agent.sock}
"""


def test_a_valid_file_names_its_socket(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(VALID % "issuer")
    assert resolve_socket(config_path=str(path), environ={}) == "/run/elsewhere/agent.sock"


def test_a_bad_edit_still_names_the_running_agents_socket(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(VALID % "isuer")
    assert resolve_socket(config_path=str(path), environ={}) == "/run/elsewhere/agent.sock"
    assert resolve_socket(config_path=str(path), environ={"TCPMESH_ADMIN_SOCKET": "/x.sock"}) == "/x.sock"


@pytest.mark.parametrize("text", ["identity: [mode: issuer\n", "- a list\n", "admin: {socket: 7}\n"])
def test_a_file_that_names_no_socket_falls_back_to_the_default(tmp_path, text) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert resolve_socket(config_path=str(path), environ={}) == DEFAULT_ADMIN_SOCKET


def test_an_unreadable_file_is_still_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        resolve_socket(config_path=str(tmp_path / "absent.yaml"), environ={})
