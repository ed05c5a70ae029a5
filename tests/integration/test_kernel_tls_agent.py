"""proxy.kernel_tls in a real agent (app.py's wiring, capture none): auto follows the start-up probe and says why
(on this host, which has no CONFIG_TLS: user-space TLS, in the log and in `tcpmesh status`); on refuses to start
on a host the probe fails, naming the field and the fix; off never probes. The switch itself:
tests/integration/test_kernel_tls_switch.py; on a kernel with kernel TLS: tests/vm/guest_kernel_tls.py."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import yaml

from agent.control.status import format_status
from agent.proxy.kernel_tls_probe import KernelTlsUnavailable, ulp_problem

TD = "ktls.test"
HOST_PROBLEM = ulp_problem()  # None on a host with kernel TLS


def agent(in_process_agent, tmp_path, setting: str):
    """An in-process agent with a registry file of its own node only, proxy.kernel_tls = ``setting``."""
    registry = tmp_path / "workloads.yaml"
    registry.write_text(yaml.safe_dump({"trust_domain": TD, "nodes": [{"name": "node1", "address": "127.0.0.1"}],
                                        "workloads": []}))
    registry.chmod(0o600)
    return in_process_agent(TD, "node1", registry={"file": str(registry)}, proxy={"kernel_tls": setting})


async def status(proc) -> dict:
    code, body = await proc.http_get("/debug/status")
    assert code == 200, body
    return json.loads(body)


def test_auto_follows_the_probe_and_says_which_tls_the_tunnels_run_and_why(in_process_agent, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tcpmesh")
    proc = agent(in_process_agent, tmp_path, "auto")

    async def main():
        async with proc.running():
            assert (await proc.next_message()).startswith(b"READY=1\n")
            return await status(proc)

    doc = asyncio.run(main())
    tls = doc["tunnel_tls"]
    assert tls["setting"] == "auto"
    text = format_status(doc)
    if HOST_PROBLEM is not None:  # this host: no CONFIG_TLS
        assert tls["in_use"] == "user" and "TCP_ULP" in tls["reason"], tls
        assert "tunnel TLS   user-space (proxy.kernel_tls auto): the start-up probe failed: setsockopt(TCP_ULP" in text
        assert [r.getMessage() for r in caplog.records if "proxy.kernel_tls auto" in r.getMessage()] == [
            f"tunnels run user-space TLS (proxy.kernel_tls auto): {HOST_PROBLEM}"]  # one line, saying why
    else:
        assert tls["in_use"] == "kernel", tls
        assert "tunnel TLS   kernel (proxy.kernel_tls auto): the start-up probe passed: a loopback TLS 1.3 pair" in text


def test_on_refuses_to_start_where_the_probe_fails_naming_the_field_and_the_fix(in_process_agent, tmp_path, monkeypatch):
    from agent.proxy import kernel_tls_probe

    if HOST_PROBLEM is None:  # a host with kernel TLS: make the probe fail the way this host's does
        monkeypatch.setattr(kernel_tls_probe, "ulp_problem", lambda: "setsockopt(TCP_ULP, \"tls\"): No such file")
    proc = agent(in_process_agent, tmp_path, "on")

    async def main():
        with pytest.raises(KernelTlsUnavailable) as refused:
            await asyncio.wait_for(proc.agent.run(), 30)
        return str(refused.value)

    message = asyncio.run(main())
    assert message.startswith("proxy.kernel_tls is on but this host cannot run kernel TLS: setsockopt(TCP_ULP")
    assert "`modprobe tls`" in message and "CONFIG_TLS" in message and "set proxy.kernel_tls to auto" in message


def test_off_runs_user_space_tls_without_probing(in_process_agent, tmp_path, monkeypatch):
    from agent.proxy import kernel_tls_probe

    def no_probe():
        raise AssertionError("proxy.kernel_tls off must not probe")
    monkeypatch.setattr(kernel_tls_probe, "ulp_problem", no_probe)
    proc = agent(in_process_agent, tmp_path, "off")

    async def main():
        async with proc.running():
            assert (await proc.next_message()).startswith(b"READY=1\n")
            return await status(proc)

    tls = asyncio.run(main())["tunnel_tls"]
    assert (tls["setting"], tls["in_use"], tls["reason"]) == ("off", "user", "proxy.kernel_tls is off")
