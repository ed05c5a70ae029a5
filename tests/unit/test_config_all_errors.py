"""A config with several problems is refused once, naming every one of them — as a validator would — instead of
one per attempt in a fixed order.

Seen failing before: the config `make install` writes, started as is, named node.name only; the next start
node.address, then capture.redirect_address, then identity.issuer.addresses: four edits, four starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import config_from_mapping, load_config, validate
from agent.errors import ConfigError, ConfigErrors

REPO = Path(__file__).resolve().parents[2]
VALID = {"node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
         "identity": {"issuer": {"addresses": ["10.76.0.5:15012"]}}}


def test_the_installed_config_unedited_names_every_field_to_fill_in_at_once(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((REPO / "systemd/config.yaml").read_text())
    with pytest.raises(ConfigErrors) as info:
        load_config(path, environ={})
    fields = [e.field for e in info.value.errors]
    assert fields == [f"{path}: node.name", f"{path}: node.address", f"{path}: capture.redirect_address",
                      f"{path}: identity.issuer.addresses"], fields
    message = str(info.value)
    assert message.startswith(f"{path}: 4 problems"), message
    assert all(f"\n  {path}: {name}" in message for name in
               ("node.name", "node.address", "capture.redirect_address", "identity.issuer.addresses")), message
    assert info.value.field == f"{path}: node.name"  # the first, for code that reads one


def test_unknown_keys_of_several_sections_are_named_together(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**VALID, "node": {"nmae": "n1", "address": "10.76.0.1"},
                                    "proxy": {"inbound_prot": 15008}, "capture": {"mode": "auto"}}))
    with pytest.raises(ConfigErrors) as info:
        load_config(path, environ={})
    assert [e.field for e in info.value.errors] == [f"{path}: node.nmae", f"{path}: proxy.inbound_prot"]
    assert all("unknown setting" in e.problem for e in info.value.errors)


def test_values_of_several_sections_are_named_together():
    doc = {**VALID, "proxy": {"inbound_port": 70000, "event_loop": "fast"}, "log_level": "loud",
           "access_log": {"backups": -1}}
    with pytest.raises(ConfigErrors) as info:
        validate(config_from_mapping(doc))
    assert [e.field for e in info.value.errors] == ["proxy.inbound_port", "proxy.event_loop", "access_log.backups",
                                                    "log_level"]


def test_one_problem_is_a_plain_config_error():
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping({**VALID, "log_level": "loud"}))
    assert type(info.value) is ConfigError and info.value.field == "log_level"


def test_a_problem_that_follows_from_another_is_not_said_twice():
    """An unknown identity.mode says so once: the checks of either mode do not run on it."""
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping({**VALID, "identity": {"mode": "magic"}}))
    assert type(info.value) is ConfigError and info.value.field == "identity.mode"
