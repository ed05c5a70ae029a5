"""A real SIGTERM to `tcpmesh run` (a separate process, capture mode none, loopback) while its identity thread
waits on an issuer that accepts the connection and never answers — a slow issuer call in flight. The stop must
end within a bound whatever the issuer does, exit 0 and leave nothing behind (no admin socket, no half-written
credential file).

Seen failing before ``IssuerClient.abort``: the stop waited for the step in flight, i.e. for the call's timeout
(``identity.issuer.timeout_seconds``, 30 s here; a dribbling issuer resets it at every byte), so SIGTERM took that
long, beyond the lab's 10 s before SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from agent.identity.ca import init_ca
from tests.integration.conftest import free_ports

TD = "td.test"
REPO = Path(__file__).resolve().parents[2]
STOP_BOUND_SECONDS = 6.0   # the drain (1 s here) and the process's exit, with room for a loaded machine


class StalledIssuer:
    """Listens on ``port`` once started; accepts connections and never sends a byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for conn in self.accepted:
            conn.close()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_during_a_stalled_issuer_call_stops_within_the_bound_and_leaves_nothing(tmp_path):
    init_ca(TD, tmp_path / "root")
    cred = tmp_path / "cred"
    cred.mkdir(mode=0o700)
    (cred / "bundle.pem").write_text((tmp_path / "root" / "ca.crt").read_text())
    (tmp_path / "token").write_text("tmbt1.node1.0.0.0")   # never read by a stalled issuer
    (tmp_path / "policies").mkdir()
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({
        "trust_domain": TD, "nodes": [{"name": "node1", "address": "127.0.0.1"}],
        "workloads": [{"name": "a-1", "namespace": "shop", "service_account": "a", "ip": "10.1.0.1",
                       "node": "node1"}]}))
    outbound, inbound, admin, issuer_port = free_ports(4)
    config = {
        "trust_domain": TD, "state_dir": str(tmp_path / "state"), "node": {"name": "node1", "address": "127.0.0.1"},
        "identity": {"mode": "issuer", "poll_seconds": 0.2,
                     "issuer": {"addresses": [f"127.0.0.1:{issuer_port}"], "credential_dir": str(cred),
                                "bootstrap_token_file": str(tmp_path / "token"), "timeout_seconds": 30}},
        "registry": {"file": str(tmp_path / "registry.yaml")}, "policy": {"dir": str(tmp_path / "policies")},
        "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")},
        "proxy": {"bind_address": "127.0.0.1", "outbound_port": outbound, "inbound_port": inbound,
                  "event_loop": "asyncio", "drain_seconds": 1},
        "admin": {"address": "127.0.0.1", "port": admin, "socket": str(tmp_path / "agent.sock")},
        "access_log": {"path": "off"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    issuer = StalledIssuer(issuer_port)
    log_path = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "config.yaml")],
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # the start's join finds nobody (refused at once): the agent runs not joined and retries on its thread
        _wait(lambda: b"NOT READY: cannot join the issuer" in log_path.read_bytes(), 60, "the agent not joined")
        issuer.start()
        _wait(lambda: issuer.accepted, 30, "the agent's join retry to reach the stalled issuer")
        time.sleep(0.5)                      # its TLS handshake is waiting for the issuer's answer
        signalled = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=STOP_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent was still running {STOP_BOUND_SECONDS:.0f}s after SIGTERM:\n"
                                 + log_path.read_text()[-2000:]) from None
        took = time.monotonic() - signalled
        assert code == 0, log_path.read_text()[-2000:]
        assert b"agent stopped" in log_path.read_bytes()
        assert not (tmp_path / "agent.sock").exists()
        assert sorted(p.name for p in cred.iterdir()) == ["bundle.pem"], "a credential file was left or half written"
        print(f"stopped {took:.2f}s after SIGTERM")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        issuer.close()
