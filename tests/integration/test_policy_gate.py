"""The agent's start gate, in process (capture mode none, loopback): with a policy file that cannot be
loaded the agent runs but stays not ready — systemd gets only STATUS= naming file, line and field,
/readyz answers 503 with the same words, neither proxy port accepts a connection — and it turns ready
(READY=1, listeners open) as soon as the file is fixed, without a restart."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import yaml

from agent.app import Agent
from agent.config import config_from_mapping, validate
from agent.identity.ca import init_ca
from agent.identity.node_ca import issue_node_files
from tests.integration.test_kubernetes_agent import free_ports

TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: data}\nspec:\n  action: DENNY\n"


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def accepts(port: int) -> str:
    """'accepted', or the error of a TCP connect to the port (the outbound proxy resets a connection
    it has no origin for at once, so a reset may win the race against the client's close)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "accepted"
    except OSError as exc:
        return repr(exc)


def test_an_unloadable_policy_set_keeps_the_agent_unready_until_it_is_fixed(tmp_path, monkeypatch):
    init_ca("td.test", tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node-ca")
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({
        "trust_domain": "td.test", "nodes": [{"name": "node1", "address": "127.0.0.1"}], "workloads": []}))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "typo.yaml").write_text(TYPO)
    outbound, inbound, admin = free_ports(3)
    config = validate(config_from_mapping({
        "trust_domain": "td.test", "state_dir": str(tmp_path / "state"),
        "node": {"name": "node1", "address": "127.0.0.1"},
        "identity": {"node_ca_dir": str(tmp_path / "node-ca")},
        "registry": {"file": str(tmp_path / "registry.yaml")},
        "policy": {"dir": str(policies), "poll_seconds": 0.2},
        "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")},
        "proxy": {"bind_address": "127.0.0.1", "outbound_port": outbound, "inbound_port": inbound,
                  "event_loop": "asyncio"},
        "admin": {"address": "127.0.0.1", "port": admin, "socket": str(tmp_path / "agent.sock")},
        "access_log": {"path": "off"},
    }))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    agent = Agent(config)
    where = f"{policies}/typo.yaml:4: spec.action"

    async def next_message(task: asyncio.Task, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            assert not task.done(), task.exception() if task.done() else ""
            assert time.monotonic() < deadline, "no sd_notify message"
            try:
                return notify.recv(4096)
            except BlockingIOError:
                await asyncio.sleep(0.02)

    async def main():
        task = asyncio.get_running_loop().create_task(agent.run())
        try:
            message = await next_message(task)
            assert message.startswith(b"STATUS=NOT READY") and where.encode() in message, message
            assert b"READY=1" not in message
            status, body = await asyncio.to_thread(readyz, admin)
            assert status == 503 and where in body, body
            for port in (outbound, inbound):
                assert "ConnectionRefusedError" in await asyncio.to_thread(accepts, port), f"port {port} listens"

            (policies / "typo.yaml").unlink()
            message = await next_message(task)
            assert message.startswith(b"READY=1\n"), message
            assert (await asyncio.to_thread(readyz, admin))[0] == 200
            for port in (outbound, inbound):
                assert await asyncio.to_thread(accepts, port) in ("accepted", "ConnectionResetError(104, "
                                                                  "'Connection reset by peer')"), port
        finally:
            agent.stop()
            await asyncio.wait_for(task, 20)

    asyncio.run(main())
