"""What a config reload applies at runtime and what it names as needing a restart (agent.control.config_changes),
and the watch's file signature across a kubelet-style ``..data`` swap (agent.control.config_watch)."""

from __future__ import annotations

import dataclasses
import os

from agent.config import Config, config_from_mapping
from agent.control import config_changes as cc
from agent.control.config_watch import signature

BASE = {"node": {"name": "node1", "address": "10.0.0.1"}, "identity": {"mode": "node_ca"}}


def config(**sections) -> Config:
    return config_from_mapping({**BASE, **sections})


def test_source_settings_apply_other_fields_wait_for_a_restart_and_stay_reported():
    running = config()
    fresh = config(identity={"mode": "issuer", "issuer": {"addresses": ["i:15012"]}}, proxy={"max_connections": 100},
                   config_file={"watch": True}, log_level="debug")
    applied, restart = cc.split(cc.changes(running, fresh))
    assert [c.field for c in applied] == ["identity.mode", "identity.issuer.addresses", "config_file.watch"]
    assert [c.describe() for c in restart] == ["log_level 'info' → 'debug'", "proxy.max_connections 32768 → 100"]
    now = cc.merged(running, applied)
    assert now.identity.mode == "issuer" and now.identity.issuer.addresses == ["i:15012"] and now.config_file.watch
    assert now.proxy == running.proxy and now.log_level == "info"
    # the next reload of the same file still names exactly the restart fields
    assert cc.split(cc.changes(now, fresh)) == ([], restart)


def test_the_restart_hint_fits_where_the_agent_runs():
    assert "rollout restart ds/tcpmesh-agent" in cc.restart_hint("kubernetes")
    assert "systemctl restart tcpmesh-agent" in cc.restart_hint("file")


def test_unchanged_is_no_change():
    assert cc.changes(config(), dataclasses.replace(config())) == []


def test_the_signature_follows_the_kubelets_data_symlink_swap(tmp_path):
    first, second = tmp_path / "..2026_12_06_10_00_00.1", tmp_path / "..2026_12_06_10_01_00.2"
    for d in (first, second):
        d.mkdir()
        (d / "config.yaml").write_text("same size\n")
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    before = signature(str(tmp_path / "config.yaml"))
    os.symlink(second.name, tmp_path / "..data_tmp")
    os.rename(tmp_path / "..data_tmp", tmp_path / "..data")   # the swap: the path itself never changes
    after = signature(str(tmp_path / "config.yaml"))
    assert before != after and after[0].endswith("..2026_12_06_10_01_00.2/config.yaml")
    assert signature(str(tmp_path / "missing.yaml"))[0] == "unreadable"


VARIABLES = {"TCPMESH_PROXY_MAX_CONNECTIONS": "proxy.max_connections", "TCPMESH_IDENTITY_MODE": "identity.mode"}
OWN = {"INVOCATION_ID": "abc", "TCPMESH_IDENTITY_MODE": "node_ca", "PATH": "/usr/bin"}


def test_the_units_environment_is_taken_only_from_its_own_execreload():
    sent = {"invocation_id": "abc", "variables": {"TCPMESH_PROXY_MAX_CONNECTIONS": "20000"}}
    environ, changed = cc.reload_environment(sent, OWN, VARIABLES)
    assert environ == {"INVOCATION_ID": "abc", "PATH": "/usr/bin", "TCPMESH_PROXY_MAX_CONNECTIONS": "20000"}
    assert [c.describe() for c in changed] == ["TCPMESH_IDENTITY_MODE 'node_ca' → None",
                                               "TCPMESH_PROXY_MAX_CONNECTIONS None → '20000'"]
    # a shell's `tcpmesh identity reload` (another or no invocation): the agent's own environment
    assert cc.reload_environment({**sent, "invocation_id": "other"}, OWN, VARIABLES) == (None, [])
    assert cc.reload_environment(sent, {"TCPMESH_IDENTITY_MODE": "node_ca"}, VARIABLES) == (None, [])
    assert cc.reload_environment(None, OWN, VARIABLES) == (None, [])
    for bad in ({"invocation_id": "abc", "variables": {"HOME": "/root"}},
                {"invocation_id": "abc", "variables": ["x"]}, "abc"):
        try:
            cc.reload_environment(bad, OWN, VARIABLES)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was taken")


def test_a_field_a_changed_variable_sets_waits_for_a_restart_even_if_it_could_switch():
    running, fresh = config(), config(identity={"mode": "issuer", "issuer": {"addresses": ["i:15012"]}})
    applied, restart = cc.split(cc.changes(running, fresh), ["identity.mode"])
    assert [c.field for c in applied] == ["identity.issuer.addresses"]
    assert [c.field for c in restart] == ["identity.mode"]
    said = cc.summary("/etc/tcpmesh/config.yaml", applied, restart,
                      [cc.Change("TCPMESH_IDENTITY_MODE", None, "issuer")], "file")
    assert said.startswith("/etc/tcpmesh/config.yaml and the unit's environment (TCPMESH_IDENTITY_MODE unset → "
                           "'issuer'): applied: identity.issuer.addresses [] → ['i:15012']; needs a restart: "
                           "identity.mode 'node_ca' → 'issuer' — "), said
    assert said.endswith("until `systemctl restart tcpmesh-agent` (the node's flows end)"), said
