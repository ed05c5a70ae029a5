"""`export TCPMESH_LAB=NAME` names the lab once (docs/tutorial-postgres-redis.md relies on it): every
`tcpmesh lab` command and the `--node` of the commands that ask an agent (agent/control/target.py)
default to it; an explicit --name / --lab still wins."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.control.target import resolve_socket
from agent.errors import TcpmeshError


def absent_lab() -> str:
    return f"nolab{uuid.uuid4().hex[:8]}"


def test_lab_commands_act_on_the_lab_named_in_the_environment():
    name = absent_lab()
    result = CliRunner().invoke(main, ["lab", "status"], env={"TCPMESH_LAB": name})
    assert result.exit_code != 0 and f"no lab named '{name}'" in result.output


def test_an_explicit_lab_name_wins_over_the_environment():
    name = absent_lab()
    result = CliRunner().invoke(main, ["lab", "status", "--name", name], env={"TCPMESH_LAB": absent_lab()})
    assert f"no lab named '{name}'" in result.output


def test_node_of_an_agent_command_finds_its_lab_in_the_environment():
    name = absent_lab()
    with pytest.raises(TcpmeshError, match=f"no lab named '{name}'"):
        resolve_socket(node="node1", environ={"TCPMESH_LAB": name})
    other = absent_lab()
    with pytest.raises(TcpmeshError, match=f"no lab named '{other}'"):
        resolve_socket(lab=other, node="node1", environ={"TCPMESH_LAB": name})


def test_without_node_or_lab_the_environment_lab_does_not_redirect_the_socket():
    assert resolve_socket(environ={"TCPMESH_LAB": absent_lab(), "TCPMESH_SOCKET": "/x.sock"}) == "/x.sock"
