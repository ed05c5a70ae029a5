"""The agent's start gate, in process (capture mode none, loopback): with a policy file that cannot be
loaded the agent runs but stays not ready — systemd gets only STATUS= naming file, line and field,
/readyz answers 503 with the same words, neither proxy port accepts a connection — and it turns ready
(READY=1, listeners open) as soon as the file is fixed, without a restart."""

from __future__ import annotations

import asyncio
import socket

import yaml

TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: data}\nspec:\n  action: DENNY\n"


def accepts(port: int) -> str:
    """'accepted', or the error of a TCP connect to the port (the outbound proxy resets a connection
    it has no origin for at once, so a reset may win the race against the client's close)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "accepted"
    except OSError as exc:
        return repr(exc)


def test_an_unloadable_policy_set_keeps_the_agent_unready_until_it_is_fixed(in_process_agent, tmp_path):
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({
        "trust_domain": "td.test", "nodes": [{"name": "node1", "address": "127.0.0.1"}], "workloads": []}))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "typo.yaml").write_text(TYPO)
    proc = in_process_agent("td.test", "node1", registry={"file": str(tmp_path / "registry.yaml")},
                            policy={"dir": str(policies), "poll_seconds": 0.2})
    where = f"{policies}/typo.yaml:4: spec.action"

    async def main():
        async with proc.running():
            message = await proc.next_message()
            assert message.startswith(b"STATUS=NOT READY") and where.encode() in message, message
            assert b"READY=1" not in message
            status, body = await proc.readyz()
            assert status == 503 and where in body, body
            for port in (proc.outbound, proc.inbound):
                assert "ConnectionRefusedError" in await asyncio.to_thread(accepts, port), f"port {port} listens"

            (policies / "typo.yaml").unlink()
            message = await proc.next_message()
            assert message.startswith(b"READY=1\n"), message
            assert (await proc.readyz())[0] == 200
            for port in (proc.outbound, proc.inbound):
                assert await asyncio.to_thread(accepts, port) in ("accepted", "ConnectionResetError(104, "
                                                                  "'Connection reset by peer')"), port

    asyncio.run(main())
