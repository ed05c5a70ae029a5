"""TCPMESH_* environment variables: a config field's override, one of tcpmesh's other named variables, or refused.

Seen failing before the check: TCPMESH_PROXY_SOURCE_ADRESS=node (one 'D') started the agent with
proxy.source_address auto, and TCPMESH_IDENTITY_ISSUER_ADDRESSES (a field of a nested section, which the
environment cannot set) was dropped the same way — not a word of either.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agent.config import (ENV_PREFIX, NON_CONFIG_ENV, apply_environment, check_environment, config_from_mapping,
                          environment_fields, load_config)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
VALID = {"node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
         "identity": {"issuer": {"addresses": ["10.76.0.5:15012"]}}}
# what the kubelet puts in every pod of tcpmesh-system while Service tcpmesh-issuer (04-issuer.yaml) exists,
# unless the pod says enableServiceLinks: false (a user's own manifest or chart may not)
ISSUER_SERVICE_LINKS = {
    "TCPMESH_ISSUER_SERVICE_HOST": "10.96.12.7", "TCPMESH_ISSUER_SERVICE_PORT": "15012",
    "TCPMESH_ISSUER_SERVICE_PORT_ISSUER": "15012", "TCPMESH_ISSUER_PORT": "tcp://10.96.12.7:15012",
    "TCPMESH_ISSUER_PORT_15012_TCP": "tcp://10.96.12.7:15012", "TCPMESH_ISSUER_PORT_15012_TCP_PROTO": "tcp",
    "TCPMESH_ISSUER_PORT_15012_TCP_PORT": "15012", "TCPMESH_ISSUER_PORT_15012_TCP_ADDR": "10.96.12.7",
}


def _load(tmp_path, environ: dict[str, str]):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(VALID))
    return load_config(path, environ=environ)


def test_a_misspelled_variable_is_refused_naming_it_and_the_closest_setting(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"TCPMESH_PROXY_SOURCE_ADRESS": "node"})
    message = str(info.value)
    assert message.startswith("TCPMESH_PROXY_SOURCE_ADRESS (environment, overrides "), message
    assert "did you mean TCPMESH_PROXY_SOURCE_ADDRESS (proxy.source_address)?" in message, message
    assert "docs/config.md" in message, message


def test_the_right_spelling_is_applied(tmp_path):
    assert _load(tmp_path, {"TCPMESH_PROXY_SOURCE_ADDRESS": "node"}).proxy.source_address == "node"


def test_a_field_of_a_nested_section_says_the_file_sets_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"TCPMESH_IDENTITY_ISSUER_ADDRESSES": "10.0.0.5:15012"})
    assert "identity.issuer" in str(info.value) and "config file" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", sorted(NON_CONFIG_ENV))
def test_tcpmeshs_other_variables_pass(tmp_path, name):
    assert _load(tmp_path, {name: "1"}).node.name == "node1"


def test_kubernetes_service_links_of_a_tcpmesh_service_pass(tmp_path):
    assert _load(tmp_path, ISSUER_SERVICE_LINKS).node.name == "node1"


@pytest.mark.parametrize("name, value", [
    ("TCPMESH_ADMN_PORT", "15020"),          # ends in _PORT but carries a port, not tcp://: a typo, not a link
    ("TCPMESH_NODE_ADRESS", "10.0.0.1"),
    ("TCPMESH_PROXY_EVENTLOOP", "asyncio"),
    ("TCPMESH_SOMETHING_SERVICE_HOST", "not-an-address"),
])
def test_near_misses_of_the_service_link_shapes_are_refused(name, value):
    with pytest.raises(ConfigError) as info:
        check_environment({name: value})
    assert info.value.field == name


def test_other_variables_are_not_looked_at():
    check_environment({"PATH": "/usr/bin", "tcpmesh_node_name": "x", "KUBERNETES_SERVICE_HOST": "10.96.0.1"})


def test_every_scalar_field_has_its_variable_and_it_is_applied():
    base = config_from_mapping(VALID)
    for name, path in environment_fields().items():
        section, _, leaf = path.rpartition(".")
        current = getattr(getattr(base, section), leaf) if section else getattr(base, leaf)
        if isinstance(current, (list, dict)):
            continue
        value = {bool: "true", int: "7", float: "7.5", str: "x"}[type(current)]
        changed = apply_environment(base, {name: value})
        got = getattr(getattr(changed, section), leaf) if section else getattr(changed, leaf)
        assert str(got).lower() == value, (name, got)
    assert environment_fields()["TCPMESH_PROXY_SOURCE_ADDRESS"] == "proxy.source_address"
    assert environment_fields()["TCPMESH_LOG_LEVEL"] == "log_level"
    assert not [n for n in environment_fields() if n.startswith("TCPMESH_IDENTITY_ISSUER")]


def test_every_tcpmesh_variable_the_repository_uses_is_known():
    """Scripts, units, manifests, tests and tools set or read TCPMESH_* names that are not config fields: each must be
    in NON_CONFIG_ENV (with what reads it), or an agent started beside it would refuse to run. C macros (bpf/, and
    the -D flags built from them) share the prefix and are no environment."""
    macros = {m for p in (REPO / "bpf").rglob("*") if p.is_file()
              for m in re.findall(r"TCPMESH_[A-Z0-9_]+", p.read_text(errors="replace"))}
    suffixes = {".py", ".sh", ".service", ".yaml", ".yml", ".default", ".md"}
    names = {"Makefile", "Dockerfile", "Vagrantfile", "run"}
    skip = {".venv", ".git", "build", "bpf", "node_modules"}
    examples = {Path(__file__).resolve(), REPO / "docs/config.md"}  # misspellings and service links, on purpose
    used: dict[str, str] = {}
    for path in REPO.rglob("*"):
        if skip & set(path.relative_to(REPO).parts) or not path.is_file() or path.resolve() in examples:
            continue
        if path.suffix not in suffixes and path.name not in names:
            continue
        for name in re.findall(r"TCPMESH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            used.setdefault(name, str(path.relative_to(REPO)))
    known = set(environment_fields()) | set(NON_CONFIG_ENV) | macros
    unknown = {name: where for name, where in used.items() if name not in known and not name.startswith(
        ("TCPMESH_R_", "TCPMESH_TC_R_", "TCPMESH_SR_"))}  # reason counters, parsed from bpf/ by name
    assert not unknown, f"TCPMESH_* names neither a config field nor in agent.config.NON_CONFIG_ENV: {unknown}"
    assert all(name.startswith(ENV_PREFIX) and why for name, why in NON_CONFIG_ENV.items())


def test_several_unknown_variables_are_named_together():
    with pytest.raises(ConfigError) as info:
        check_environment({"TCPMESH_NODE_ADRESS": "10.0.0.1", "TCPMESH_PROXY_EVENTLOOP": "asyncio"})
    assert [e.field for e in info.value.errors] == ["TCPMESH_NODE_ADRESS", "TCPMESH_PROXY_EVENTLOOP"]


def test_an_invalid_value_a_variable_sets_is_refused_naming_the_variable(tmp_path):
    """What `systemctl reload` (and a start) says of an /etc/default/tcpmesh edit that makes the config invalid.
    Seen failing before: '<file>: proxy.max_connections: must not be negative (got -1)' — the file, which does not
    hold that value; the variable that does was not named."""
    path = tmp_path / "config.yaml"
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"TCPMESH_PROXY_MAX_CONNECTIONS": "-1"})
    message = str(info.value)
    assert message.startswith(f"TCPMESH_PROXY_MAX_CONNECTIONS (environment, sets proxy.max_connections over {path}): "
                              "must not be negative (got -1); use 0 for no cap"), message
    assert message.endswith("use 0 for no cap — in TCPMESH_PROXY_MAX_CONNECTIONS, where the agent's environment sets "
                            "it (the systemd unit: /etc/default/tcpmesh; the DaemonSet: its env); or remove "
                            f"TCPMESH_PROXY_MAX_CONNECTIONS, and {path} decides proxy.max_connections"), message
    assert info.value.value == -1


def test_a_check_of_two_fields_names_the_variable_that_set_the_other(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**VALID, "proxy": {"max_connections_per_identity": 100}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"TCPMESH_PROXY_MAX_CONNECTIONS": "50"})
    message = str(info.value)
    assert message.startswith(f"{path}: proxy.max_connections_per_identity: exceeds proxy.max_connections (50; set "
                              "by TCPMESH_PROXY_MAX_CONNECTIONS in the environment)"), message


def test_several_problems_name_the_variable_of_each(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**VALID, "proxy": {"max_handshakes": -2}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"TCPMESH_PROXY_MAX_CONNECTIONS": "-1", "TCPMESH_NODE_NAME": "node1"})
    assert [e.field for e in info.value.errors] == [
        f"TCPMESH_PROXY_MAX_CONNECTIONS (environment, sets proxy.max_connections over {path})",
        f"{path}: proxy.max_handshakes"], str(info.value)
