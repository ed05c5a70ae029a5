"""The operator's CLI against real lab agents (#22): every command that asks an agent finds it the
same way — its admin socket, named by --lab/--node, TCPMESH_SOCKET (which `lab status` prints) or
--socket — and a refused policy change is visible in `tcpmesh status`, `lab status`, /debug/status,
/healthz and the metric the alert rule reads, with the valid edits it holds back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from agent.lab.files import admin_socket_path
from agent.lab.issuer import credential_dir
from tests.e2e.conftest import module_lab

RELOAD_TIMEOUT = 15.0  # the agent polls its policy directory every 2 s


op_lab = module_lab("op_lab", "op", 2, 2, "op.tcpmesh")


def tcpmesh(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, f"tcpmesh {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def write_policy(lab, name: str, text: str) -> str:
    path = f"{lab.plan.state_dir}/policies/{name}"
    with open(path + ".tmp", "w") as f:
        f.write(textwrap.dedent(text))
    os.replace(path + ".tmp", path)
    return path


def deny(name: str, workload: str, principal: str) -> str:
    return f"""\
        kind: AuthorizationPolicy
        metadata: {{name: {name}, namespace: lab}}
        spec:
          selector: {{workload: {workload}}}
          action: DENY
          rules: [{{from: [{{principals: ["{principal}"]}}]}}]
        """


TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: lab}\nspec:\n  action: DENNY\n"


def node_status(lab, node: str) -> dict:
    out = tcpmesh("status", "--json", "--lab", lab.name, "--node", node, check=False)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def wait_status(lab, node: str, predicate) -> dict:
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        doc = node_status(lab, node)
        if predicate(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.3)


def test_every_agent_command_reaches_a_lab_node_from_the_host(op_lab):
    lab = op_lab
    status = tcpmesh("lab", "status", "--name", lab.name).stdout
    socket1 = admin_socket_path(lab.node(1))
    assert f"export TCPMESH_SOCKET={socket1}" in status
    env = {"TCPMESH_SOCKET": socket1}
    listed = tcpmesh("workload", "list", env=env).stdout
    assert "lab/n1p1" in listed and "captured" in listed
    assert tcpmesh("status", env=env).stdout.startswith("node node1: READY")
    assert tcpmesh("flows", "--lab", lab.name, "--node", "node2").returncode == 0
    certs = tcpmesh("cert", "inspect", "--lab", lab.name, "--node", "node2").stdout
    assert lab.pod("n2p1").spiffe_id in certs and lab.pod("n1p1").spiffe_id not in certs
    from_file = tcpmesh("cert", "inspect", f"{credential_dir(lab.node(1))}/bundle.pem").stdout  # the node's root
    assert "1 certificate(s)" in from_file and "(a CA)" in from_file and "expires in" in from_file
    assert tcpmesh("status", "--node", "node2", env={"TCPMESH_LAB": lab.name}).stdout.startswith("node node2: READY")
    unknown = tcpmesh("flows", "--workload", "n9p9", env=env, check=False)
    assert unknown.returncode == 2
    assert ("--workload n9p9: no such workload in the registry of node node1 (its workloads: lab/n1p1, lab/n1p2, "
            "lab/n2p1, lab/n2p2)") in unknown.stderr
    assert tcpmesh("flows", "--workload", "lab/n2p1", env=env).stdout.split()[:3] == ["STATE", "REPORTER", "SOURCE"]
    wrong = tcpmesh("flows", "--lab", lab.name, "--node", "node9", check=False)
    assert wrong.returncode == 2 and "has no node named 'node9'; its nodes: node1, node2" in wrong.stderr


def test_a_refused_policy_change_shows_everywhere_with_its_held_back_edits(op_lab):
    lab = op_lab
    shop = lab.pod("n1p1").spiffe_id
    kept = write_policy(lab, "kept.yaml", deny("kept", "n2p2", shop))
    loaded = wait_status(lab, "node2", lambda d: d["policy"]["authorization"] == 1)
    assert loaded["policy"]["in_force"] and loaded["policy"]["loaded_at"] and not loaded["problems"]
    try:
        write_policy(lab, "kept.yaml", deny("kept", "n2p1", shop))  # a valid edit...
        typo = write_policy(lab, "typo.yaml", TYPO)                 # ...in the same change as a broken file
        doc = wait_status(lab, "node2", lambda d: d["policy"]["refused"])
        refused = doc["policy"]["refused"]
        assert refused["error"] == f"{typo}:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT"
        assert refused["held_back"] == [kept]
        text = tcpmesh("status", "--lab", lab.name, "--node", "node2", check=False)
        assert text.returncode == 1
        assert f"{typo}:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT" in text.stdout
        assert f"changed  {kept}: valid, held back (not in force)" in text.stdout
        assert "problem: policy change refused" in text.stdout
        assert "tcpmesh_policy_change_refused 1.0" in lab.metrics_text(2)
        assert b"warning: policy change refused" in lab.admin_get(2, "/healthz")
        assert json.loads(lab.admin_get(2, "/debug/status"))["policy"]["refused"]["held_back"] == [kept]
        lab_status = tcpmesh("lab", "status", "--name", lab.name)
        assert "CHANGE REFUSED" in lab_status.stdout and "node2: policy change refused" in lab_status.stderr
    finally:
        os.unlink(f"{lab.plan.state_dir}/policies/typo.yaml")
    fixed = wait_status(lab, "node2", lambda d: not d["policy"]["refused"])
    assert not fixed["problems"], fixed["problems"]
    assert "tcpmesh_policy_change_refused 0.0" in lab.metrics_text(2)
    os.unlink(kept)
    wait_status(lab, "node2", lambda d: d["policy"]["authorization"] == 0)  # the next test starts from no policy


def test_explain_asks_the_agent_and_explains_the_set_in_force_while_a_change_is_refused(op_lab):
    lab = op_lab
    shop = lab.pod("n1p1").spiffe_id
    # from no policy in force: a count of 1 must mean deny-shop, not a previous test's policy not yet unloaded
    wait_status(lab, "node2", lambda d: d["policy"]["authorization"] == 0 and not d["policy"]["refused"])
    path = write_policy(lab, "deny-shop.yaml", deny("deny-shop", "n2p2", shop))
    wait_status(lab, "node2", lambda d: d["policy"]["authorization"] == 1)
    at = ["--lab", lab.name, "--node", "node2"]
    try:
        plain = tcpmesh("policy", "explain", *at, "--from", "plaintext", "--to", "lab/n2p2", "--port", "6379").stdout
        assert plain.startswith("ALLOW  plaintext -> lab/n2p2:6379")
        assert "no ALLOW policy selects lab/n2p2 and no DENY policy selecting it matches (lab/deny-shop)" in plain
        assert (f"lab/deny-shop (DENY, {path}:1): did not deny: no rule matches: rule 0: from[0]: principals [{shop}] "
                "name identities, which a plaintext client (no mTLS) has none of") in plain
        write_policy(lab, "typo.yaml", TYPO)
        wait_status(lab, "node2", lambda d: d["policy"]["refused"])
        during = tcpmesh("policy", "explain", *at, "--from", shop, "--to", "lab/n2p2", "--port", "6379")
        assert during.stdout.startswith(f"DENY  {shop} -> lab/n2p2:6379")
        assert "because: denied by DENY policy lab/deny-shop rule 0" in during.stdout
        assert "NOTE: the files on disk are not what is enforced: a change was refused (" in during.stdout
        assert "typo.yaml:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT" in during.stdout
        missing = tcpmesh("policy", "explain", *at, "--from", shop, "--to", "lab/n2p9", "--port", "6379", check=False)
        assert missing.returncode == 2
        assert ("--to lab/n2p9: no such workload in the registry of node node2 (workloads of namespace lab: "
                "lab/n1p1, lab/n1p2, lab/n2p1, lab/n2p2)") in missing.stderr
    finally:
        for name in ("typo.yaml", "deny-shop.yaml"):
            if os.path.exists(f"{lab.plan.state_dir}/policies/{name}"):
                os.unlink(f"{lab.plan.state_dir}/policies/{name}")
    wait_status(lab, "node2", lambda d: not d["policy"]["refused"] and d["policy"]["authorization"] == 0)
