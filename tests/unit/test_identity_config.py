"""The identity section of the agent config: the issuer by default, the legacy node CA directory and the
development root shortcut only when identity.mode: node_ca says so, and short TTLs only behind an explicit
development switch."""

import pytest

from agent.config import config_from_mapping, validate
from agent.errors import ConfigError

BASE = {"node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"}}


ISSUER = {"issuer": {"addresses": ["10.76.0.5:15012"]}}


def _config(identity: dict):
    """A legacy (node intermediate) identity section, named as such."""
    return validate(config_from_mapping({**BASE, "identity": {"mode": "node_ca", **identity}}))


def test_defaults_are_the_issuer_and_the_legacy_node_ca_directory_only_when_named() -> None:
    identity = validate(config_from_mapping({**BASE, "identity": ISSUER})).identity
    assert identity.mode == "issuer" and identity.issuer.credential_dir == "/var/lib/tcpmesh/node-credential"
    assert identity.svid_ttl_seconds == 3600 and not identity.dev_short_ttl and identity.poll_seconds == 5.0
    legacy = _config({}).identity
    assert legacy.node_ca_dir == "/etc/tcpmesh/node-ca" and legacy.ca_dir == ""


def test_the_root_shortcut_without_the_legacy_mode_is_refused_naming_both() -> None:
    """identity.ca_dir signs with the root on the node: with the default mode it was silently ignored."""
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping({**BASE, "identity": {**ISSUER, "ca_dir": "/tmp/root"}}))
    assert info.value.field == "identity.ca_dir" and "identity.mode: node_ca" in str(info.value)


def test_short_ttl_is_refused_with_the_switch_named() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"svid_ttl_seconds": 5})
    assert info.value.field == "identity.svid_ttl_seconds"
    assert "at least 60 seconds" in str(info.value) and "identity.dev_short_ttl: true" in str(info.value)


def test_dev_short_ttl_allows_seconds_but_not_less_than_two() -> None:
    assert _config({"svid_ttl_seconds": 3, "dev_short_ttl": True}).identity.svid_ttl_seconds == 3
    with pytest.raises(ConfigError, match="at least 2 seconds"):
        _config({"svid_ttl_seconds": 1, "dev_short_ttl": True})


@pytest.mark.parametrize("identity, field", [
    ({"node_ca_dir": ""}, "identity.node_ca_dir"),
    ({"poll_seconds": 0}, "identity.poll_seconds"),
    ({"mode": "issuer", **ISSUER, "poll_seconds": 0}, "identity.poll_seconds"),
])
def test_identity_errors_name_the_field(identity, field) -> None:
    with pytest.raises(ConfigError) as info:
        _config(identity)
    assert info.value.field == field


def test_root_shortcut_alone_is_enough() -> None:
    assert _config({"node_ca_dir": "", "ca_dir": "/tmp/root"}).identity.ca_dir == "/tmp/root"
