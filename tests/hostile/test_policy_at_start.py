"""Attack: wait for an agent restart while the policy set cannot be loaded (issue 14, item 1).

An operator leaves a typo in one policy file (`action: DENNY`) or policy.dir goes missing; hot reload
refuses the change and keeps the previous set, so nothing seems wrong. Then the agent restarts
(upgrade, OOM kill, reboot): with no previous set to keep, it must not start with an empty set
(`default_action: ALLOW`, every workload PERMISSIVE). The attacker — the pod the DENY policy names,
and a process on the node that STRICT keeps out — tries again and again while the agent starts.

Wanted (docs/policy.md "At start"): the agent refuses to become ready, tells why (`file:line: field:
problem` in its log and on /readyz), the denied pod stays unable to reach the workload, plaintext
into the STRICT workload stays dropped, and once the file is fixed the agent turns ready with the
files' decisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from agent.lab import lab as labops
from tests.e2e.conftest import Lab
from tests.hostile.conftest import admin_get, plaintext_connect

PORT = 7410
RELOAD = 2.0 + 3.0  # the agent's policy poll interval plus slack
# readiness after the fix: one poll, then the listeners open; 6-7 s measured at load average 14 on the
# shared 2-core machine (the agent is still busy finishing its start), so a liveness bound, not a target
READY_AFTER_FIX = 20.0
WATCH_SECONDS = 4.0  # how long the attacker keeps trying while the agent is up but not ready


@pytest.fixture(scope="module")
def lab(bpf_capable):
    name = f"hp{uuid.uuid4().hex[:6]}"
    lab = None
    try:
        lab = Lab(name, labops.lab_up(name, 2, 2, "hp.tcpmesh"))
        os.makedirs(policy_dir(lab), exist_ok=True)
        lab.start_server("n2p1", PORT, "digest")
        yield lab
    finally:
        if lab is not None:
            lab.stop_apps()
        labops.lab_down(name)


def policy_dir(lab) -> str:
    return f"{lab.plan.state_dir}/policies"


def write(lab, name: str, text: str) -> None:
    path = f"{policy_dir(lab)}/{name}"
    with open(path + ".tmp", "w") as f:
        f.write(textwrap.dedent(text))
    os.replace(path + ".tmp", path)


def intended_policies(lab) -> None:
    """n1p2 may not reach n2p1; n2p1 takes no plaintext."""
    write(lab, "deny-n1p2.yaml", f"""\
        kind: AuthorizationPolicy
        metadata: {{name: deny-n1p2, namespace: lab}}
        spec:
          selector: {{workload: n2p1}}
          action: DENY
          rules:
            - from: [{{principals: ["{lab.pod('n1p2').spiffe_id}"]}}]
        ---
        kind: PeerAuthentication
        metadata: {{name: n2p1-strict, namespace: lab}}
        spec:
          selector: {{workload: n2p1}}
          mtls: {{mode: STRICT}}
        """)


BROKEN = """\
    kind: AuthorizationPolicy
    metadata: {name: typo, namespace: lab}
    spec:
      action: DENNY
    """


def reaches(lab, pod: str) -> bool:
    result = lab.run_client(pod, f"{lab.pod('n2p1').ip}:{PORT}", 1000, "digest", name="hp-attacker")
    return "error" not in result and result["reply"].split()[:1] == [result["sent_sha256"]]


def wait_until(predicate, what: str, timeout: float = RELOAD) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f}s"
        time.sleep(0.3)


def readyz(lab) -> tuple[int, str] | None:
    try:
        return admin_get(lab.node(2), "/readyz")
    except OSError:
        return None  # the admin endpoint is not up yet


def assert_files_decide(lab) -> None:
    target = (lab.pod("n2p1").ip, PORT)
    wait_until(lambda: not reaches(lab, "n1p2"), "the DENY for n1p2")
    wait_until(lambda: plaintext_connect(lab.node(2).netns, target) == "TimeoutError", "STRICT for n2p1")
    assert reaches(lab, "n1p1"), "n1p1 is allowed by the files and must get through the mesh"


def doctor_of(node) -> dict:
    """`tcpmesh doctor --config` of a lab node, run from the host as an operator would (JSON)."""
    out = subprocess.run([sys.executable, "-m", "agent", "doctor", "--config", node.config_file, "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def restart_and_attack(lab, expected_in_reason: str) -> None:
    """Restart node2's agent with an unloadable policy set; attack while it starts; check what it says."""
    node = lab.node(2)
    record = labops.lab_restart_agent(lab.name, node.name, wait=False)
    wait_until(lambda: readyz(lab) is not None, "the admin endpoint of the restarted agent", timeout=60)
    target = (lab.pod("n2p1").ip, PORT)
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        assert not reaches(lab, "n1p2"), "the denied pod reached the workload while the policy set was broken"
        assert plaintext_connect(node.netns, target) != "connected", \
            "plaintext reached the STRICT workload while the policy set was broken"
    status, body = readyz(lab)
    assert status == 503, f"/readyz answered {status} {body!r} with an unloadable policy set"
    assert expected_in_reason in body, body
    assert os.path.exists(f"/proc/{record.pid}"), "the agent must stay up (not ready), not exit"
    log = open(node.log_file).read()
    assert expected_in_reason in log, f"the agent's log does not say {expected_in_reason!r}"


def test_a_typo_at_restart_keeps_the_denied_pod_out_until_it_is_fixed(lab):
    intended_policies(lab)
    assert_files_decide(lab)
    write(lab, "typo.yaml", BROKEN)
    time.sleep(RELOAD)  # hot reload refuses it; the intended set stays in force
    assert not reaches(lab, "n1p2")

    restart_and_attack(lab, "typo.yaml:4: spec.action")
    doctor = doctor_of(lab.node(2))
    assert not doctor["policy"]["loads"] and "typo.yaml:4: spec.action" in doctor["policy"]["detail"], doctor["policy"]
    running = doctor["running_agent"]
    assert running["reachable"] and not running["ready"] and "typo.yaml:4: spec.action" in running["detail"], running
    assert not doctor["can_run"]

    os.unlink(f"{policy_dir(lab)}/typo.yaml")
    wait_until(lambda: (readyz(lab) or (0, ""))[0] == 200, "readiness after the fix", timeout=READY_AFTER_FIX)
    assert_files_decide(lab)


def test_a_missing_policy_dir_at_restart_keeps_the_denied_pod_out(lab):
    intended_policies(lab)
    assert_files_decide(lab)
    moved = policy_dir(lab) + ".moved"
    os.rename(policy_dir(lab), moved)
    try:
        time.sleep(RELOAD)  # the running agents must not take a vanished directory for "no policies"
        assert not reaches(lab, "n1p2"), "a vanished policy.dir was taken for an empty set at hot reload"
        restart_and_attack(lab, f"{policy_dir(lab)}:0: policy.dir: does not exist")
    finally:
        os.rename(moved, policy_dir(lab))
    wait_until(lambda: (readyz(lab) or (0, ""))[0] == 200, "readiness after the fix", timeout=READY_AFTER_FIX)
    assert_files_decide(lab)
