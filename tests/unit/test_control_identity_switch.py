"""``identity.reload`` (agent.control.identity_switch): the config file is re-read, only identity.mode switches,
and a refusal names the field and leaves the agent as it was. The switch itself runs through a real
rotator and minting workers (the lab test, tests/e2e/test_issuer_migration.py, does it with the issuer)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest
import yaml

from agent.config import Config, load_config
from agent.control.admin_socket import AdminSocket
from agent.identity.ca import init_ca
from agent.control.identity_switch import IdentityReloadRefused, reload_identity
from agent.identity.node_ca import issue_node_files
from agent.identity.spiffe import SpiffeId
from agent.identity.svid_rotator import CaSource, IdentityRotator

TD = "td.test"
WEB = SpiffeId.parse("spiffe://td.test/ns/shop/sa/web")


BASE = {"trust_domain": TD, "node": {"name": "node1", "address": "10.0.0.1"},
        "capture": {"redirect_address": "10.0.0.1"}}


def write_config(path, **identity) -> str:
    path.write_text(yaml.safe_dump({**BASE, "identity": identity}))
    return str(path)


@pytest.fixture
def running(tmp_path) -> Config:
    return load_config(write_config(tmp_path / "running.yaml", mode="node_ca", node_ca_dir=str(tmp_path / "node1")))


def test_same_mode_switches_nothing_and_says_what_waits_for_a_restart(tmp_path, running) -> None:
    path = write_config(tmp_path / "c.yaml", mode="node_ca", node_ca_dir=str(tmp_path / "node1"), svid_ttl_seconds=600)
    config, answer = asyncio.run(reload_identity(path, running, rotator=None))
    assert config is running and answer["switched"] is False
    assert answer["message"].startswith(f"{path}: needs a restart: identity.svid_ttl_seconds 3600 → 600 — "), answer
    assert "`systemctl restart tcpmesh-agent`" in answer["message"], answer
    _, again = asyncio.run(reload_identity(str(tmp_path / "running.yaml"), running, rotator=None))
    assert again["message"] == f"{tmp_path / 'running.yaml'}: no change from the running config", again


@pytest.mark.parametrize("field", ["node", "trust_domain", "unreadable", "invalid"])
def test_a_file_that_cannot_apply_is_refused_naming_why(tmp_path, running, field) -> None:
    path = tmp_path / "c.yaml"
    doc = {**BASE, "node": {"name": "node1", "address": "10.0.0.1"}, "identity": {"mode": "issuer", "issuer": {"addresses": ["127.0.0.1:15012"]}}}
    if field == "node":
        doc["node"]["name"] = "node2"
    elif field == "trust_domain":
        doc["trust_domain"] = "other.test"
    elif field == "invalid":
        doc["identity"]["mode"] = "bogus"
    if field != "unreadable":
        path.write_text(yaml.safe_dump(doc))
    with pytest.raises(IdentityReloadRefused) as refused:
        asyncio.run(reload_identity(str(path), running, rotator=None))
    message = str(refused.value)
    assert "nothing changed: node node1 stays on identity.mode node_ca" in message
    assert {"node": "node.name", "trust_domain": "trust_domain", "unreadable": "cannot read",
            "invalid": "identity.mode"}[field] in message


def test_admin_socket_switches_through_a_real_rotator(tmp_path) -> None:
    """issuer -> node_ca (going back, step 4 of the migration) needs no issuer: a real switch, end to end."""
    init_ca(TD, tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node1")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "back")
    rotator = IdentityRotator(CaSource(str(tmp_path / "node1"), node="node1"), ttl_seconds=3600)
    rotator.store.ensure([WEB])
    serial = rotator.store.svid(WEB).serial
    path = write_config(tmp_path / "c.yaml", mode="node_ca", node_ca_dir=str(tmp_path / "back"))
    state = {"config": dataclasses.replace(load_config(path), identity=dataclasses.replace(
        load_config(path).identity, mode="issuer"))}

    async def reload(request):
        state["config"], answer = await reload_identity(path, state["config"], rotator)
        return answer

    async def scenario():
        sock = str(tmp_path / "admin.sock")
        server = AdminSocket(sock, workloads=None, async_ops={"identity.reload": reload})
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(b'{"op": "identity.reload"}\n')
            answer = json.loads(await reader.readline())
            writer.close()
            return answer
        finally:
            await server.stop()

    answer = asyncio.run(scenario())
    assert answer["ok"] and answer["switched"] and answer["from"] == "issuer" and answer["mode"] == "node_ca", answer
    assert answer["identities"] == 1 and "a restart stays on it" in answer["message"]
    assert state["config"].identity.mode == "node_ca"
    assert rotator.store.svid(WEB).serial != serial
    assert rotator.signing.source.startswith(os.fspath(tmp_path / "back"))


class Exploding:
    """A rotator whose switch fails with something that is no IdentityError (a full disk, a bug)."""

    async def switch_source(self, source):
        raise OSError(28, "No space left on device")


def test_an_unexpected_failure_is_refused_too_never_a_dropped_request(tmp_path, running) -> None:
    issuer_mode = dataclasses.replace(running, identity=dataclasses.replace(running.identity, mode="issuer"))
    path = write_config(tmp_path / "c.yaml", mode="node_ca", node_ca_dir=str(tmp_path / "node1"))
    with pytest.raises(IdentityReloadRefused, match="No space left on device.*nothing changed"):
        asyncio.run(reload_identity(path, issuer_mode, Exploding()))
