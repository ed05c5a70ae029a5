"""Attack: a user who is not root rewrites the agent's config file, then waits for a restart or a reload.

The config file decides where the policies and the registry come from (``policy.dir``, ``registry.file``),
the identity source and what is captured: whoever can write it can point ``policy.dir`` at an empty
directory of their own, so the policy and registry checks (test_policy_file_trust.py,
test_registry_file_trust.py) would guard the wrong files. Before ``agent.config.load_agent_config`` the
agent read a 0666 config at start (``tcpmesh run``) and at ``identity reload``/``systemctl reload``/the
config watch without a word. The promise: the agent refuses it like an invalid file — it does not start,
a reload changes nothing — naming the file, its mode and the fix, with the same rule as every other
file it decides by (``agent/filetrust.py``; a read-only mount, the DaemonSet's ConfigMap, passes).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import yaml

from agent.config import load_agent_config, load_config
from agent.control.identity_switch import IdentityReloadRefused, reload_identity
from agent.errors import ConfigError

BASE = {"trust_domain": "td.test", "node": {"name": "node1", "address": "10.0.0.1"},
        "capture": {"redirect_address": "10.0.0.1"},
        "identity": {"mode": "node_ca", "node_ca_dir": "/nonexistent/node1"}}


def _config(directory, mode: int) -> str:
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    os.chmod(path, mode)
    return str(path)


def test_an_agent_refuses_to_start_from_a_config_others_may_write(tmp_path):
    path = _config(tmp_path / "etc", 0o666)
    with pytest.raises(ConfigError) as refused:
        load_agent_config(path)
    message = str(refused.value)
    assert path in message and "mode 0666" in message and f"chmod 0644 {path}" in message, message
    load_config(path)  # other commands (status, doctor) still read it to find the agent
    os.chmod(path, 0o644)
    assert load_agent_config(path).node.name == "node1"


def test_a_reload_from_a_config_others_may_write_changes_nothing(tmp_path):
    running = load_config(_config(tmp_path / "etc", 0o644))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # a directory anyone may write: they can swap the file between edits
    path = _config(shared, 0o644)
    with pytest.raises(IdentityReloadRefused, match="chmod go-w") as refused:
        asyncio.run(reload_identity(path, running, rotator=None))
    assert "nothing changed" in str(refused.value)
