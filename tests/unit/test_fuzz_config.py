"""Fuzzing the config loader (agent/config.py) with Hypothesis: 10,000 mappings built from the real
schema (every section and setting, values from a palette of edge cases: boundary numbers, NaN and
infinities, digit strings the int parser might trip on, wrong types, nesting), 10,000 environments
of TCPMESH_* overrides, and 2,000 YAML texts through ``load_config``.

The loader may refuse (ConfigError, naming the field) but never raise anything else, and a config it
accepts is sound: every setting has its declared type, numbers are finite, ports are ports.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.config import ENV_PREFIX, Config, apply_environment, config_from_mapping, load_config, validate
from agent.errors import ConfigError

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECTIONS = {f.name: [g.name for g in fields(getattr(Config(), f.name))] if is_dataclass(getattr(Config(), f.name))
            else None for f in fields(Config)}
SCALARS = [name for name, subs in SECTIONS.items() if subs is None]
PALETTE = [
    0, 1, -1, 2, 0.05, 0.1, 1.5, 60, 65535, 65536, 4096, 2 ** 31, 2 ** 64, -(2 ** 63), 10 ** 30, 10 ** 400,
    float("nan"), float("inf"), float("-inf"), 1e-300, -0.0, True, False, None,
    "", " ", "0", "1", "-1", "--5", "-", "²", "٣", "１２", "1e3", "0x10", " 7 ", "nan", "inf", "-inf", "yes", "no",
    "true", "False", "ALLOW", "DENY", "auto", "ebpf-connect", "ebpf-tc", "iptables", "none", "uvloop", "asyncio",
    "on", "off", "debug", "info", "10.0.0.1", "0.0.0.0", "256.1.1.1", "::1", "127.0.0.1", "/run/x", "relative/path",
    "/", "/sys/fs/cgroup", "cluster.local", "UPPER.case", "a" * 300, "\x00", "é", "spiffe://x/y",
    [], [1, 2], {}, {"x": 1}, {"name": "n"}, ["a"],
]
NODE = {"name": "node1", "address": "10.0.0.1"}  # most documents carry what validate requires, to get deep


def document_from(genome: bytes) -> dict:
    """A config mapping read off ``genome``: per entry a section byte, a setting byte, a value byte."""
    doc: dict = {"node": dict(NODE), "capture": {"mode": "none"}} if genome[:1] and genome[0] % 4 else {}
    sections = sorted(SECTIONS)
    for i in range(1, len(genome) - 2, 3):
        section = sections[genome[i] % len(sections)] if genome[i] % 8 else f"bogus{genome[i]}"
        value = PALETTE[genome[i + 2] % len(PALETTE)]
        if section in SCALARS or section.startswith("bogus"):
            doc[section] = value
            continue
        names = SECTIONS[section]
        entry = doc.setdefault(section, {}) if genome[i + 1] % 16 else value
        if not isinstance(entry, dict):
            doc[section] = entry  # a section that is not a mapping
            continue
        key = names[genome[i + 1] % len(names)] if genome[i + 1] % 11 else f"unknown{genome[i + 1]}"
        entry[key] = value
    return doc


def assert_sound(config: Config) -> None:
    """Every accepted setting has the declared type, is finite, and the ports are TCP ports."""
    for top in fields(Config):
        value = getattr(config, top.name)
        inner = [(f"{top.name}.{f.name}", getattr(value, f.name), type(getattr(type(value)(), f.name)))
                 for f in fields(value)] if is_dataclass(value) else [(top.name, value, type(getattr(Config(), top.name)))]
        for name, setting, kind in inner:
            assert type(setting) is kind, f"{name} = {setting!r} is not a {kind.__name__}"
            if kind is float:
                assert math.isfinite(setting), f"{name} = {setting!r} accepted"
    for port in (config.proxy.outbound_port, config.proxy.inbound_port, config.admin.port):
        assert 1 <= port <= 65535


def check(build) -> None:
    try:
        config = validate(build())
    except ConfigError as exc:
        assert exc.field and str(exc)
        return
    assert_sound(config)


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=1, max_size=90))
def test_mappings_are_refused_by_field_or_give_a_sound_config(genome):
    check(lambda: config_from_mapping(document_from(genome)))


ENV_NAMES = [f"{ENV_PREFIX}{top}_{sub}".upper() for top, subs in SECTIONS.items() if subs for sub in subs] + \
            [f"{ENV_PREFIX}{name}".upper() for name in SCALARS]
STRINGS = [v for v in PALETTE if isinstance(v, str)] + ["5", "2.5", "30", "15008", "0.5", "3600", "1024", "1" * 400]


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=2, max_size=40))
def test_environment_overrides_are_refused_by_name_or_give_a_sound_config(genome):
    environ = {ENV_NAMES[genome[i] % len(ENV_NAMES)]: STRINGS[genome[i + 1] % len(STRINGS)]
               for i in range(0, len(genome) - 1, 2)}
    base = config_from_mapping({"node": dict(NODE), "capture": {"mode": "none"}})
    check(lambda: apply_environment(base, environ))


YAML_TOKENS = ["node:", "  name: n1", "  address: 10.0.0.1", "proxy:", "  inbound_port: ", "capture: {mode: none}",
               "admin: [1, 2]", "- x", "{", "}", "[", "]", ": ", "!!python/object:os.system", "&a", "*a", ".nan",
               ".inf", "0x1F", "1_000", "~", "'", '"', "\t", "#", "---", "...", "? ", "<<: *a", "é", "\x00",
               "\n", "\n", "  ", "yes", "42", "-3", "trust_domain: x", "log_level: debug", "!!binary aGk="]


@settings(max_examples=2_000, **FUZZ)
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=30))
def test_yaml_files_are_refused_by_field_or_give_a_sound_config(tmp_path_factory, tokens):
    path = tmp_path_factory.getbasetemp() / "fuzz-config.yaml"
    path.write_text("".join(tokens))
    check(lambda: load_config(path, environ={}))
