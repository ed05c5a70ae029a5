"""Readiness and the join in ``identity.mode: issuer`` (docs/identity.md "The agent and the issuer"), on a real lab:

- an agent restarted reports ready (/readyz 200 — systemd's READY=1 comes from the same moment) only once
  every local identity holds its SVID again: at the first 200 ``/debug/certs`` has no identity pending,
  and a meshed connect to its pod and from it succeeds at once (before: ready ~1 s before the SVIDs, the
  connects in between refused);
- an agent whose node has no credential yet, started while no issuer replica runs, stays up and not ready
  (retrying the join with backoff, each failure logged with the addresses tried, ``tcpmesh status`` says
  NOT JOINED) and turns ready within seconds of a replica starting (before: it exited at once);
- a refused join (a bad token) still ends the agent non-zero with the issuer's reason in its log.
Seen failing against the code before the change: the first two tests (ready with n2p1's identity
pending; the agent exited with "no issuer answered").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agent.lab import issuer as issuer_lab
from agent.lab import lab as labops
from agent.lab.nsenter import http_get_in_netns
from tests.e2e.conftest import Lab, module_lab


lab = module_lab("lab", "isr", 2, 1, "e2e.tcpmesh", capture_mode="ebpf-connect")


def readyz(lab: Lab, index: int) -> int | None:
    node = lab.node(index)
    try:
        return http_get_in_netns(node.netns, f"http://{node.admin_address}/readyz", timeout=1.0)[0]
    except OSError:
        return None


def certs(lab: Lab, index: int) -> dict:
    return json.loads(lab.admin_get(index, "/debug/certs"))


def exit_code(pid: int, timeout: float) -> int | None:
    """The agent's exit status if it ends within ``timeout`` (it is this process's child), else None."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def echo_both_ways(lab: Lab) -> None:
    for client, server in (("n1p1", "n2p1"), ("n2p1", "n1p1")):
        result = lab.run_client(client, f"{lab.pod(server).ip}:7401", 4096, "echo")
        assert result.get("received") == 4096 and result["received_sha256"] == result["sent_sha256"], \
            (client, server, result)


def without_credential(lab: Lab, token: str | None) -> Path:
    """Node 2 as on a fresh install: no credential (the bundle stays); ``token`` (None: a valid new one)."""
    from agent.issuer.tokens import load_token_key, make_token

    node = lab.node(2)
    directory = Path(issuer_lab.credential_dir(node))
    for name in ("credential.crt", "credential.key"):
        (directory / name).unlink(missing_ok=True)
    if token is None:
        key = load_token_key(f"{issuer_lab.directory(lab.plan)}/token.key")
        token = make_token(key, node.name, time.time(), 600)
    Path(issuer_lab.token_file(node)).write_text(token + "\n")
    return directory


def test_ready_only_once_every_local_identity_has_its_svid(lab):
    lab.start_server("n1p1", 7401, "echo")
    lab.start_server("n2p1", 7401, "echo")
    echo_both_ways(lab)
    for _ in range(2):
        record = labops.lab_restart_agent(lab.name, "node2", wait=False)
        deadline = time.monotonic() + 60
        while readyz(lab, 2) != 200:
            assert exit_code(record.pid, 0) is None, Path(lab.node(2).log_file).read_text()[-3000:]
            assert time.monotonic() < deadline, "node2's agent was not ready within 60s"
            time.sleep(0.02)
        report = certs(lab, 2)
        held = {i["spiffe_id"] for i in report["identities"]}
        assert lab.pod("n2p1").spiffe_id in held and report["issuer"]["pending"] == [], report
        echo_both_ways(lab)


def test_a_fresh_node_waits_for_the_issuer_and_joins_when_it_starts(lab):
    directory = without_credential(lab, None)
    for replica in issuer_lab.replicas(lab.plan):
        labops.lab_stop_issuer(lab.name, replica.name)
    try:
        record = labops.lab_restart_agent(lab.name, "node2", wait=False)
        log_file = Path(lab.node(2).log_file)
        time.sleep(8)     # several join attempts (1 s, 2 s, 4 s ...)
        assert exit_code(record.pid, 0) is None, "the agent exited: " + log_file.read_text()[-3000:]
        assert readyz(lab, 2) == 503
        text = log_file.read_text()
        assert "cannot join the issuer as node node2" in text and "no issuer answered" in text, text[-3000:]
        assert not (directory / "credential.crt").exists()
        status = subprocess.run([sys.executable, "-m", "agent", "status", "--lab", lab.name, "--node", "node2"],
                                capture_output=True, text=True, timeout=30)
        assert "NOT READY: not joined to the issuer yet" in status.stdout and "NOT JOINED" in status.stdout, \
            status.stdout + status.stderr
    finally:
        started = time.monotonic()
        for replica in issuer_lab.replicas(lab.plan):
            labops.lab_start_issuer(lab.name, replica.name)
    deadline = started + 20      # the join backoff is capped at 10 s (±20 %), plus the first SVIDs
    while readyz(lab, 2) != 200:
        assert exit_code(record.pid, 0) is None, log_file.read_text()[-3000:]
        assert time.monotonic() < deadline, "not ready 20s after the issuer started: " + log_file.read_text()[-3000:]
        time.sleep(0.05)
    print(f"ready {time.monotonic() - started:.1f}s after the issuer replicas were started")
    assert (directory / "credential.crt").exists()
    echo_both_ways(lab)


def test_a_refused_join_still_ends_the_agent_with_the_reason(lab):
    without_credential(lab, "not-a-token")
    try:
        record = labops.lab_restart_agent(lab.name, "node2", wait=False)
        code = exit_code(record.pid, 60)
        text = Path(lab.node(2).log_file).read_text()
        assert code not in (None, 0), text[-3000:]
        assert "the issuer refused this node's credential" in text, text[-3000:]
    finally:
        without_credential(lab, None)
        labops.lab_restart_agent(lab.name, "node2")
