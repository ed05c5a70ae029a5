"""The issuer's config file: every refusal names the file, and a YAML error the line, as the agent's config does.

Seen failing before: a YAML error read "--config: not valid YAML: while parsing a block mapping in
"<unicode string>", line 1, column 1 ..." (PyYAML's own text, the file last, no fix), and a wrong field named
neither the file nor anything but "limits.workers".
"""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.issuer.config import load_issuer_config


def test_invalid_yaml_names_the_file_the_line_and_the_line_itself(tmp_path):
    path = tmp_path / "issuer.yaml"
    path.write_text("trust_domain: td.test\nlisten:\n  port: 15012\n address: 0.0.0.0\n")
    with pytest.raises(ConfigError) as info:
        load_issuer_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: not valid YAML: "), message
    assert "(got 'address: 0.0.0.0')" in message and "indentation" in message, message
    assert "<unicode string>" not in message, message


@pytest.mark.parametrize("text, field", [
    ("ca_dir: /etc/tcpmesh/issuer\nlimits: {workers: 0}\n", "limits.workers: "),
    ("ca_dir: /etc/tcpmesh/issuer\nlisten: {prot: 15012}\n", "listen.prot: unknown setting"),
    ("ca_dir: /etc/tcpmesh/issuer\ntrust_domain: Bad Domain\n", "trust_domain: "),
    ("- a list\n", "must be a YAML mapping"),
])
def test_a_wrong_field_names_the_file_and_the_field(tmp_path, text, field):
    path = tmp_path / "issuer.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_issuer_config(path)
    assert str(info.value).startswith(f"{path}: {field}"), str(info.value)


def test_a_missing_file_says_which_and_how_to_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_issuer_config(tmp_path / "absent.yaml")
    assert "--config" in str(info.value) and "absent.yaml" in str(info.value)


def test_a_valid_file_loads(tmp_path):
    path = tmp_path / "issuer.yaml"
    path.write_text("trust_domain: td.test\nca_dir: /etc/tcpmesh/issuer\nlisten: {port: 15013}\n")
    assert load_issuer_config(path).listen.port == 15013
