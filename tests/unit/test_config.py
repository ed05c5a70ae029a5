"""Config loading and validation: every error names the field, the value and the fix."""

import pytest

from agent.config import apply_environment, config_from_mapping, load_config, validate
from agent.errors import ConfigError

VALID = {"node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
         "identity": {"issuer": {"addresses": ["10.76.0.5:15012"]}}}


def test_valid_minimal_config_gets_documented_defaults():
    config = validate(config_from_mapping(VALID))
    assert config.proxy.outbound_port == 15001
    assert config.proxy.inbound_port == 15008
    assert config.admin.port == 15020
    assert config.capture.mode == "auto"
    assert config.proxy.source_address == "auto"
    assert config.proxy.same_node == "local"
    assert config.proxy.kernel_tls == "auto"
    assert config.identity.mode == "issuer"   # no signing key on a node unless the config asks for the legacy one


def test_a_config_naming_no_identity_mode_and_no_issuer_fails_with_both_fixes():
    """The default is the issuer: a config that says nothing about identity does not quietly become a node
    intermediate (which can sign any identity). Seen failing before: it validated as identity.mode node_ca."""
    doc = {key: value for key, value in VALID.items() if key != "identity"}
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping(doc))
    assert info.value.field == "identity.issuer.addresses"
    assert "identity.issuer.addresses" in str(info.value) and "identity.mode: node_ca" in str(info.value)
    legacy = validate(config_from_mapping({**doc, "identity": {"mode": "node_ca"}}))
    assert legacy.identity.mode == "node_ca"


@pytest.mark.parametrize("doc, field, words", [
    ({"node": {"name": "n", "adress": "x"}}, "node.adress", "unknown setting"),
    ({"proxy": {"outbound_port": "many"}}, "proxy.outbound_port", "must be of type int"),
    ({"proxy": {"outbound_port": True}}, "proxy.outbound_port", "must be of type int"),
    ({"node": "node1"}, "node", "must be a mapping"),
])
def test_shape_errors_name_the_field(doc, field, words):
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.field == field
    assert words in str(info.value)


@pytest.mark.parametrize("patch, field", [
    ({"node": {"name": "", "address": "10.76.0.1"}}, "node.name"),
    ({"node": {"name": "n1", "address": "10.76.0.300"}}, "node.address"),
    ({"trust_domain": "Bad Domain"}, "trust_domain"),
    ({"capture": {"mode": "magic", "redirect_address": "169.254.1.1"}}, "capture.mode"),
    ({"capture": {"redirect_address": ""}}, "capture.redirect_address"),
    ({"proxy": {"inbound_port": 70000}}, "proxy.inbound_port"),
    ({"proxy": {"inbound_port": 15001}}, "proxy.outbound_port"),
    ({"identity": {"svid_ttl_seconds": 5}}, "identity.svid_ttl_seconds"),
    ({"log_level": "loud"}, "log_level"),
    ({"proxy": {"source_address": "spoof"}}, "proxy.source_address"),
    ({"proxy": {"same_node": "plaintext"}}, "proxy.same_node"),
    ({"proxy": {"kernel_tls": "yes"}}, "proxy.kernel_tls"),
    ({"access_log": {"path": "/var/log/tcpmesh/access.log", "key": "/var/log/tcpmesh/keys/audit.key"}},
     "access_log.key"),
    ({"access_log": {"key": "audit.key"}}, "access_log.key"),
])
def test_semantic_errors_name_the_field(patch, field):
    doc = {**VALID, **patch}
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping(doc))
    assert info.value.field == field
    assert field in str(info.value)


def test_environment_overrides_file_values():
    config = apply_environment(config_from_mapping(VALID), {"TCPMESH_NODE_NAME": "node9", "TCPMESH_ADMIN_PORT": "9999",
                                                            "TCPMESH_LOG_LEVEL": "debug"})
    assert (config.node.name, config.admin.port, config.log_level) == ("node9", 9999, "debug")


def test_environment_value_of_wrong_type_names_the_variable():
    with pytest.raises(ConfigError, match="TCPMESH_ADMIN_PORT"):
        apply_environment(config_from_mapping(VALID), {"TCPMESH_ADMIN_PORT": "lots"})


def test_missing_file_says_which_and_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)



def test_errors_of_a_config_file_name_the_file_and_the_field(tmp_path):
    """A newcomer with several configs must see which file is wrong. Seen failing: 'node.nmae: unknown setting'."""
    path = tmp_path / "c.yaml"
    path.write_text("node: {nmae: node1, address: 10.76.0.1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: node.nmae: unknown setting.*known settings here: address, name"):
        load_config(path, environ={})
    path.write_text("node: {name: node1, address: 10.76.0.1}\ncapture: {redirect_address: ''}\n"
                    "identity: {issuer: {addresses: ['10.76.0.5:15012']}}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: capture.redirect_address"):
        load_config(path, environ={})


def test_an_environment_override_error_names_the_variable_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("node: {name: node1, address: 10.76.0.1}\n")
    with pytest.raises(ConfigError, match=rf"^TCPMESH_ADMIN_PORT \(environment, overrides {path}\): must be of type int"):
        load_config(path, environ={"TCPMESH_ADMIN_PORT": "lots"})


def test_invalid_yaml_names_the_file_line_and_the_line_itself(tmp_path):
    """Seen failing: the location said '<unicode string>' and the file came last."""
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  name: node1\n address: 10.76.0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: not valid YAML: .*\(got 'address: 10.76.0.1'\); .*indentation"):
        load_config(path, environ={})


@pytest.mark.parametrize("doc, fix", [
    ({"identity": {"issuer": {"addresses": "10.76.0.5:15012"}}}, "a YAML list, e.g. [a, b]"),
    ({"proxy": {"outbound_port": "many"}}, "a whole number"),
    ({"capture": {"ipv6": "maybe"}}, "true or false"),
    ({"node": {"name": ["node1"]}}, "a single value"),
    ({"proxy": {"connect_timeout_seconds": "soon"}}, "a number"),
])
def test_a_value_of_the_wrong_type_says_what_to_write(doc, fix):
    """Seen failing: 'must be of type list (got ...)' and nothing on how to write one."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**VALID, **doc})
    assert fix in info.value.fix, str(info.value)


def test_an_unknown_kernel_tls_setting_names_the_field_the_value_and_the_three_choices():
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping({**VALID, "proxy": {"kernel_tls": "kernel"}}))
    text = str(info.value)
    assert "proxy.kernel_tls" in text and "'kernel'" in text
    assert "use auto (" in text and "on (" in text and "off (user space)" in text
