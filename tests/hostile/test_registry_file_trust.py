"""Attack: a user who is not root gives their own process a workload's identity through the registry file.

The static registry file (``registry.file``, systemd and Vagrant nodes) decides which cgroup and address
get which SPIFFE identity. If group or others may write it (an editor's umask, config management) — or a
directory above it — any local user can put their own cgroup under ``shop/web`` and connect as it, or move
a workload's identity. Before ``agent/registry/static_file.py`` checked who may change the file, both of
the files below were loaded (seen on main: a 0666 registry gave the attacker's cgroup the identity). The
promise: the file is refused like an invalid one, naming the file, its mode and the fix — at start the
agent does not run, at a hot reload the previous workloads stay (``WorkloadController.reload_file``), and
the ``chmod`` that fixes it is noticed without an edit (``_digest`` covers owner and mode).
"""

from __future__ import annotations

import os

import pytest

from agent.control.workloads import _digest
from agent.errors import ConfigError
from agent.registry.static_file import load_registry_for_node

REGISTRY = """\
nodes: [{name: node1, address: 10.76.0.1}]
workloads:
  - {name: web-1, namespace: shop, service_account: web, ip: 10.77.1.10, node: node1,
     cgroup: /sys/fs/cgroup/attacker}
"""


def test_a_registry_file_others_may_write_is_refused_and_a_chmod_fixes_it(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    path = directory / "workloads.yaml"
    path.write_text(REGISTRY)
    os.chmod(path, 0o666)
    before = _digest(str(path))
    with pytest.raises(ConfigError) as refused:
        load_registry_for_node(path, "td", "node1")
    message = str(refused.value)
    assert "registry.file" in message and str(path) in message and "mode 0666" in message and "chmod" in message, \
        message
    os.chmod(path, 0o644)
    assert _digest(str(path)) != before, "a chmod that fixes the file would not be noticed by the hot reload"
    assert "node1" in load_registry_for_node(path, "td", "node1").nodes


def test_a_registry_file_in_a_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone may rename the file away and put theirs in its place
    path = shared / "workloads.yaml"
    path.write_text(REGISTRY)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod go-w"):
        load_registry_for_node(path, "td", "node1")
