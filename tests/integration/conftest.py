"""The in-process agent of the integration tier: a real ``Agent`` (app.py wiring) on loopback with
capture mode ``none``, its own CA and node intermediate, free ports, an sd_notify socket to read, and
a bounded stop — so a failing assertion ends the test at once instead of leaving the agent (and its
watch threads) running.

``in_process_agent(trust_domain, node, registry=..., policy=..., proxy=...)`` builds one; the
mappings are merged over the defaults (one level deep). ``config_writer``: called with the config as
YAML, returns the file the agent is started with (``--config``: the file its reloads re-read). ``async with agent.running() as task:``
starts ``Agent.run`` and always stops it (SIGTERM's path), cancelling it after ``STOP_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import yaml

from agent.app import Agent
from agent.config import Config, config_from_mapping, validate
from agent.identity.ca import init_ca
from agent.identity.node_ca import issue_node_files

STOP_TIMEOUT = 20.0     # the agent's drain (proxy.drain_seconds) plus slack
MESSAGE_TIMEOUT = 20.0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class InProcessAgent:
    agent: Agent
    config: Config
    outbound: int
    inbound: int
    admin: int
    notify: socket.socket
    task: asyncio.Task | None = None

    async def next_message(self, timeout: float = MESSAGE_TIMEOUT) -> bytes:
        """The next sd_notify datagram without its ``EXTEND_TIMEOUT_USEC=`` lines (the agent extends systemd's
        start timeout every 2 s while it waits — for its first SVIDs, the issuer, a policy set — so how many
        come depends on the machine's load; a datagram of nothing else is skipped); fails at once if the agent
        task ended meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = self.notify.recv(4096).split(b"\n")
                kept = [line for line in lines if not line.startswith(b"EXTEND_TIMEOUT_USEC=")]
                if any(kept):
                    return b"\n".join(kept)
                continue
            except BlockingIOError:
                pass
            if self.task is not None and self.task.done():
                why = "cancelled" if self.task.cancelled() else self.task.exception()
                raise AssertionError(f"no sd_notify message, and the agent stopped: {why}")
            assert time.monotonic() < deadline, "no sd_notify message"
            await asyncio.sleep(0.02)

    async def http_get(self, path: str) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
        return await asyncio.to_thread(get)

    async def readyz(self) -> tuple[int, str]:
        return await self.http_get("/readyz")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.Task]:
        self.task = asyncio.get_running_loop().create_task(self.agent.run())
        try:
            yield self.task
        finally:
            self.agent.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
                raise AssertionError(f"the agent did not stop within {STOP_TIMEOUT:.0f}s of agent.stop()")


@pytest.fixture
def in_process_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    notifies: list[socket.socket] = []

    def make(trust_domain: str, node: str, config_writer: Callable[[str], Path] | None = None,
             **sections: dict[str, Any]) -> InProcessAgent:
        init_ca(trust_domain, tmp_path / "root")
        issue_node_files(tmp_path / "root", node, tmp_path / "node-ca")
        (tmp_path / "policies").mkdir(exist_ok=True)  # an agent without a policy directory does not turn ready
        outbound, inbound, admin = free_ports(3)
        mapping: dict[str, Any] = {
            "trust_domain": trust_domain, "state_dir": str(tmp_path / "state"),
            "node": {"name": node, "address": "127.0.0.1"},
            "identity": {"mode": "node_ca", "node_ca_dir": str(tmp_path / "node-ca")},
            "registry": {},
            "policy": {"dir": str(tmp_path / "policies")},
            "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")},
            "proxy": {"bind_address": "127.0.0.1", "outbound_port": outbound, "inbound_port": inbound,
                      "event_loop": "asyncio"},
            "admin": {"address": "127.0.0.1", "port": admin, "socket": str(tmp_path / "agent.sock")},
            "access_log": {"path": "off"},
        }
        for name, values in sections.items():
            mapping[name] = {**mapping.get(name, {}), **values}
        config = validate(config_from_mapping(mapping))
        path = config_writer(yaml.safe_dump(mapping)) if config_writer is not None else None  # the agent's --config
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notifies.append(notify)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        return InProcessAgent(Agent(config, str(path) if path else ""), config, outbound, inbound, admin, notify)

    yield make
    for notify in notifies:
        notify.close()
