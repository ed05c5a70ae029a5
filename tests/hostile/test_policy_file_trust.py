"""Attack: a user who is not root rewrites authorization through a policy file others may write.

docs/security.md puts the files under ``/etc/tcpmesh`` in the node's trusted computing base and says of
policies "whoever can write them decides who may connect". The issuer checks that only root (or its own
user) can change the files it decides by (``agent/issuer/filetrust.py``); the agent's ``policy.dir`` is not
checked. On a real node the operator's config management, an editor's umask or a symlink into a shared
directory can leave a policy file group- or world-writable: then any local user (or a hostPath-mounted
pod) can delete a DENY or make a workload PERMISSIVE, and the agent loads it at the next reload.

The attack runs on real files and modes (no lab needed: the loader is the target): a DENY policy in a
0666 file, and one reached through a symlink whose target sits in a world-writable, non-sticky
directory. The promise: such a set is refused like an invalid file — at start the agent stays not
ready (every decision denies), at reload the previous set stays — with the file, its mode/owner and the
``chmod``/``chown`` fix in the error. Today it is loaded silently: xfail(strict) until the fix lands.
"""

from __future__ import annotations

import os

import pytest

from agent.policy.engine import Request
from agent.policy.source import PolicySource

DENY_OTHER = """\
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: data}
spec:
  selector: {workload: db}
  action: DENY
  rules: [{from: [{principals: ["spiffe://td/ns/shop/sa/other"]}]}]
"""
OTHER = Request("spiffe://td/ns/shop/sa/other", "shop", "db", "data", 5432)

FIX = ("agent/policy/source.py PolicySource.load should check policy.dir and every policy file (and a "
       "symlink's target directory) with the issuer's owner/mode rule (agent/issuer/filetrust.py, moved "
       "to a module both may import): refuse as a PolicyError naming file, mode, owner and the chmod/chown fix")


def _refused(source: PolicySource, path: str) -> bool:
    return (source.reload() is False and not source.in_force and path in source.last_error
            and "chmod" in source.last_error and not source.decide(OTHER).allowed)


@pytest.mark.xfail(strict=True, reason="policy files others may write are loaded: " + FIX)
def test_a_policy_file_others_may_write_is_refused_at_start(tmp_path):
    directory = tmp_path / "policies"
    directory.mkdir(mode=0o755)
    path = directory / "deny.yaml"
    path.write_text(DENY_OTHER)
    os.chmod(path, 0o666)
    assert _refused(PolicySource(str(directory)), str(path)), \
        "a 0666 policy file was loaded: any local user can rewrite who may connect"


@pytest.mark.xfail(strict=True, reason="a policy symlink into a directory others may write is followed: " + FIX)
def test_a_policy_symlink_into_a_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # world-writable, no sticky bit: anyone may replace the target
    target = shared / "deny.yaml"
    target.write_text(DENY_OTHER)
    os.chmod(target, 0o644)
    directory = tmp_path / "policies"
    directory.mkdir(mode=0o755)
    (directory / "deny.yaml").symlink_to(target)
    assert _refused(PolicySource(str(directory)), str(directory / "deny.yaml")), \
        "a policy symlink into a world-writable directory was followed"
