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
``chmod``/``chown`` fix in the error. Both attacks succeeded before ``agent/policy/source.py`` checked
who may change its files (seen as xfail(strict) tests that failed with ``--runxfail``: "a 0666 policy file was
loaded", "… symlink … was followed"). A read-only mount (a Kubernetes ConfigMap volume mounted ``readOnly``,
whose directory kubelet may leave world-writable) is not a way in: nobody in the agent's mount namespace can
change it, so it passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import astuple

import pytest

from agent.policy.engine import Request
from agent.policy.source import PolicySource
from tests.conftest import require_binary

DENY_OTHER = """\
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: data}
spec:
  selector: {workload: db}
  action: DENY
  rules: [{from: [{principals: ["spiffe://td/ns/shop/sa/other"]}]}]
"""
OTHER = Request("spiffe://td/ns/shop/sa/other", "shop", "db", "data", 5432)


def _refused(source: PolicySource, path: str) -> bool:
    return (source.reload() is False and not source.in_force and path in source.last_error
            and "chmod" in source.last_error and not source.decide(OTHER).allowed)



def test_a_policy_file_others_may_write_is_refused_at_start(tmp_path):
    directory = tmp_path / "policies"
    directory.mkdir(mode=0o755)
    path = directory / "deny.yaml"
    path.write_text(DENY_OTHER)
    os.chmod(path, 0o666)
    source = PolicySource(str(directory))
    assert _refused(source, str(path)), "a 0666 policy file was loaded: any local user can rewrite who may connect"
    assert "mode 0666" in source.last_error and "policy.dir" in source.last_error, source.last_error
    os.chmod(path, 0o644)   # the fix the message names, with no edit of the content
    assert source.reload() is True and source.in_force and not source.decide(OTHER).allowed, \
        f"the chmod that fixes the file was not noticed: {source.last_error}"



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


def test_a_policy_directory_on_a_read_only_mount_is_loaded_whatever_its_modes(tmp_path, privileged):
    """The refusal must not break the DaemonSet: its policies are a ConfigMap volume mounted readOnly."""
    require_binary("unshare", "util-linux")  # a private mount namespace for the read-only tmpfs
    mount = tmp_path / "volume"
    mount.mkdir()
    script = textwrap.dedent(f"""\
        import os, sys
        from agent.policy.source import PolicySource
        from agent.policy.engine import Request
        d = {str(mount)!r}
        os.system(f"mount -t tmpfs -o mode=0777 tcpmesh-test {{d}}")
        with open(f"{{d}}/deny.yaml", "w") as f:
            f.write({DENY_OTHER!r})
        os.chmod(f"{{d}}/deny.yaml", 0o666)
        writable = PolicySource(d)
        writable.reload()
        os.system(f"mount -o remount,ro {{d}}")
        ro = PolicySource(d)
        ro.reload()
        print(writable.in_force, ro.in_force, ro.decide(Request(*{astuple(OTHER)!r})).allowed, ro.last_error)
        """)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    writable_loaded, ro_loaded, allowed, error = out.stdout.split(" ", 3)
    assert writable_loaded == "False", "the same 0666 file on a writable mount must be refused (control)"
    assert (ro_loaded, allowed) == ("True", "False"), f"a read-only mount's policies were not loaded: {error}"
