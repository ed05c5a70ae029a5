"""Authorization on the lab: the same destination allows one identity and denies another; a denied
client fails fast; both reporters and the access log agree; a denied connection never reaches the
workload (no packet on its veth, no accept in the server); policies hot-reload; a broken file leaves
the previous decision in force and is counted."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
import uuid

from agent.lab import lab as labops
from agent.lab.sniff import PacketCapture
from tests.e2e.conftest import module_lab

RELOAD = 2.0 + 3.0  # the agent's poll interval plus slack


policy_lab = module_lab("policy_lab", "po", 2, 2, "po.tcpmesh", servers=[("n2p1", 7200, "digest")])


def write_policy(lab, name: str, text: str) -> None:
    path = f"{lab.plan.state_dir}/policies/{name}"
    with open(path + ".tmp", "w") as f:
        f.write(textwrap.dedent(text))
    os.replace(path + ".tmp", path)


def only_n1p1(lab) -> str:
    return f"""\
        kind: AuthorizationPolicy
        metadata: {{name: only-n1p1, namespace: lab}}
        spec:
          selector: {{workload: n2p1}}
          action: ALLOW
          rules:
            - from: [{{principals: ["{lab.pod('n1p1').spiffe_id}"]}}]
              to: [{{ports: [7200]}}]
        """


def attempt(lab, pod: str, tag: str) -> tuple[dict, float]:
    started = time.monotonic()
    result = lab.run_client(pod, f"{lab.pod('n2p1').ip}:7200", 2000, "digest", name=tag)
    return result, time.monotonic() - started


def wait_decision(lab, pod: str, allowed: bool, timeout: float = RELOAD) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result, _ = attempt(lab, pod, "po-probe")
        if ("error" not in result and bool(result["reply"])) == allowed:
            return result
        assert time.monotonic() < deadline, f"decision for {pod} did not become allowed={allowed}: {result}"
        time.sleep(0.3)


def test_allowed_and_denied_identities_and_agreeing_records(policy_lab):
    lab = policy_lab
    write_policy(lab, "only-n1p1.yaml", only_n1p1(lab))
    wait_decision(lab, "n1p2", allowed=False)

    ok, _ = attempt(lab, "n1p1", "po-allowed")
    assert "error" not in ok and ok["reply"].split()[0] == ok["sent_sha256"]
    denied, elapsed = attempt(lab, "n1p2", "po-denied")
    assert "ConnectionResetError" in denied.get("error", ""), denied
    assert elapsed < 1.0 + 0.5, f"denied client took {elapsed:.2f}s (includes ~0.3s of process start)"

    src = lab.wait_flow(1, lambda f: f.get("comm") == "po-denied")
    dst = lab.wait_flow(2, lambda f: f["flow_id"] == src["flow_id"])
    assert src["response_flags"] == dst["response_flags"] == "DENY"
    assert src["policy"] == dst["policy"] == "lab/only-n1p1"
    assert dst["source_principal"] == lab.pod("n1p2").spiffe_id
    for node, reporter in ((1, "source"), (2, "destination")):
        metrics = lab.admin_get(node, "/metrics").decode()
        assert any(line.startswith("tcpmesh_tcp_connections_failed_total{") and 'response_flags="DENY"' in line
                   and f'reporter="{reporter}"' in line and 'source_workload="n1p2"' in line
                   for line in metrics.splitlines()), f"node{node} did not count the denial"
    log = open(lab.node(2).log_file).read()
    assert src["flow_id"] in log and "lab/only-n1p1" in log  # the access log names the policy


def test_a_denied_connection_never_reaches_the_workload(policy_lab):
    """docs/security.md: DENY resets "before the workload sees a byte". The workload's side: a capture
    on its veth sees no packet of the denied connection, and its server accepts nothing; an allowed
    connection in the same capture shows both observers work."""
    lab = policy_lab
    write_policy(lab, "only-n1p1.yaml", only_n1p1(lab))  # n1p1 to port 7200 only: 7201 is denied to all
    wait_decision(lab, "n1p2", allowed=False)
    server = lab.start_server("n2p1", 7201, "digest")  # prints one line per connection it served
    target, node2 = lab.pod("n2p1"), lab.node(2)
    marker = f"DENIED-MARKER-{uuid.uuid4().hex}"
    with PacketCapture(node2.netns, target.node_ifname) as at_workload:
        allowed, _ = attempt(lab, "n1p1", "po-control")
        denied = lab.run_client("n1p2", f"{target.ip}:7201", 2000, "digest", name="po-never", marker=marker)
        src = lab.wait_flow(1, lambda f: f.get("comm") == "po-never")
        dst = lab.wait_flow(2, lambda f: f["flow_id"] == src["flow_id"])  # node2 decided and closed it
    assert "error" not in allowed and allowed["reply"].split()[0] == allowed["sent_sha256"], allowed
    assert "ConnectionResetError" in denied.get("error", ""), denied
    assert dst["response_flags"] == "DENY" and dst["bytes_received"] == 0, dst
    segments = at_workload.tcp_segments()
    assert any(s.dport == 7200 and s.payload for s in segments), "the capture did not see the allowed connection"
    assert not any(7201 in (s.sport, s.dport) for s in segments), "a denied connection reached the workload's veth"
    assert not any(marker.encode() in s.payload for s in segments), "denied bytes reached the workload"
    assert select.select([server.stdout], [], [], 0)[0] == [], f"the server served: {server.stdout.readline()}"


def test_hot_reload_flips_and_broken_files_are_refused(policy_lab):
    lab = policy_lab
    write_policy(lab, "only-n1p1.yaml", only_n1p1(lab))
    wait_decision(lab, "n1p2", allowed=False)
    errors_before = _load_errors(lab)

    write_policy(lab, "only-n1p1.yaml", only_n1p1(lab).replace("workload: n2p1", "workload: n2p2"))
    wait_decision(lab, "n1p2", allowed=True)  # the policy no longer selects n2p1

    write_policy(lab, "only-n1p1.yaml", only_n1p1(lab))
    wait_decision(lab, "n1p2", allowed=False)
    write_policy(lab, "broken.yaml", "kind: AuthorizationPolicy\nmetadata: {name: broken, namespace: lab}\n"
                                     "spec: {action: PERMIT}\n")
    time.sleep(RELOAD)
    assert _load_errors(lab) > errors_before
    assert "broken.yaml:3: spec.action" in open(lab.node(2).log_file).read()
    denied, _ = attempt(lab, "n1p2", "po-still-denied")
    assert "ConnectionResetError" in denied.get("error", ""), "the previous policy set must stay in force"
    os.unlink(f"{lab.plan.state_dir}/policies/broken.yaml")
    os.unlink(f"{lab.plan.state_dir}/policies/only-n1p1.yaml")
    wait_decision(lab, "n1p2", allowed=True)


HELD_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
def echo(word):
    s.sendall(word)
    got = b""
    while len(got) < len(word):
        chunk = s.recv(len(word) - len(got))
        if not chunk:
            return "eof"
        got += chunk
    return "echoed" if got == word else "garbled"
print(json.dumps({"before": echo(b"one")}), flush=True)
sys.stdin.readline()  # the test loads a DENY meanwhile
try:
    print(json.dumps({"after": echo(b"two")}), flush=True)
except OSError as exc:
    print(json.dumps({"after": type(exc).__name__}), flush=True)
"""


def test_a_deny_loaded_while_a_connection_is_open_refuses_new_ones_and_keeps_the_open_one(policy_lab):
    """docs/policy.md "Hot reload": a policy decides when a connection opens; one already open when a
    DENY is loaded stays open until it ends (as of this writing — a test, so that changing it is a
    decision), while every new connection of that client is refused at once."""
    lab = policy_lab
    wait_decision(lab, "n1p2", allowed=True)
    lab.start_server("n2p1", 7202, "echo")
    held = labops.lab_exec(lab.name, "n1p2", [sys.executable, "-c", HELD_CLIENT, lab.pod("n2p1").ip, "7202"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.apps.append(held)
    try:
        assert json.loads(held.stdout.readline()) == {"before": "echoed"}
        write_policy(lab, "only-n1p1.yaml", only_n1p1(lab))
        wait_decision(lab, "n1p2", allowed=False)  # new connections of n1p2 are denied now
        held.stdin.write("go\n")
        held.stdin.flush()
        assert json.loads(held.stdout.readline()) == {"after": "echoed"}, "the open connection was cut"
    finally:
        os.unlink(f"{lab.plan.state_dir}/policies/only-n1p1.yaml")
    wait_decision(lab, "n1p2", allowed=True)


def _load_errors(lab) -> float:
    for line in lab.admin_get(2, "/metrics").decode().splitlines():
        if line.startswith("tcpmesh_policy_load_errors_total "):
            return float(line.split()[1])
    raise AssertionError("tcpmesh_policy_load_errors_total missing")


PEER_AUTH = """\
    kind: PeerAuthentication
    metadata: {{name: n2p1-inbound, namespace: lab}}
    spec:
      selector: {{workload: n2p1}}
      mtls: {{mode: {mode}}}
    """


def plaintext_connect(netns: str, address: tuple[str, int]) -> str:
    """Connect from ``netns`` outside every pod cgroup (not meshed): 'connected' or the error."""
    from agent.lab.nsenter import connect_in_netns

    try:
        connect_in_netns(netns, address, timeout=1.0).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__


def plaintext_counter(lab, name: str) -> float:
    for line in lab.admin_get(2, "/metrics").decode().splitlines():
        if line.startswith(f"tcpmesh_plaintext_{name}_total{{") and 'workload="n2p1"' in line:
            return float(line.split()[-1])
    return 0.0


def test_strict_inbound_drops_plaintext_in_the_kernel_and_permissive_counts_it(policy_lab):
    lab = policy_lab
    target = (lab.pod("n2p1").ip, 7200)
    write_policy(lab, "peer-auth.yaml", PEER_AUTH.format(mode="STRICT"))
    deadline = time.monotonic() + RELOAD
    while plaintext_connect(lab.node(2).netns, target) == "connected":
        assert time.monotonic() < deadline, "STRICT did not take effect"
        time.sleep(0.3)
    rejected_before = plaintext_counter(lab, "rejected")
    # from the node itself and from a process in another pod's network namespace outside its cgroup
    assert plaintext_connect(lab.node(2).netns, target) in ("TimeoutError", "timeout")
    assert plaintext_connect(lab.pod("n1p2").netns, target) in ("TimeoutError", "timeout")
    assert plaintext_counter(lab, "rejected") >= rejected_before + 2
    meshed, _ = attempt(lab, "n1p1", "po-strict-meshed")  # through the mesh it still works
    assert "error" not in meshed and meshed["reply"].split()[0] == meshed["sent_sha256"]

    write_policy(lab, "peer-auth.yaml", PEER_AUTH.format(mode="PERMISSIVE"))
    deadline = time.monotonic() + RELOAD
    while plaintext_connect(lab.node(2).netns, target) != "connected":
        assert time.monotonic() < deadline, "PERMISSIVE did not take effect"
        time.sleep(0.3)
    accepted = plaintext_counter(lab, "accepted")
    assert plaintext_connect(lab.pod("n1p2").netns, target) == "connected"
    assert plaintext_counter(lab, "accepted") >= accepted + 1
    os.unlink(f"{lab.plan.state_dir}/policies/peer-auth.yaml")
