"""Fuzzing the config loader (the package agent/config/) with Hypothesis: 10,000 mappings built from the real
schema (every section and setting, values from a palette of edge cases: boundary numbers, NaN and
infinities, digit strings the int parser might trip on, wrong types, nesting), 10,000 environments
of TCPMESH_* overrides, and 2,000 YAML texts through ``load_config``.

The loader may refuse (ConfigError, naming a field the input set, or a required one) but never raise
anything else, and a config it accepts is sound: every setting has its declared type, numbers are
finite, ports are ports. The mappings are mostly valid (each setting its default or a little above,
one document in three with one near miss): a seeded test requires at least half of them accepted
(66 % measured; it was 3 % when every entry drew from the edge-case palette).
"""

from __future__ import annotations

import math
import random
from dataclasses import fields, is_dataclass

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.config import ENV_PREFIX, Config, apply_environment, config_from_mapping, load_config, validate
from agent.errors import ConfigError, problems_of

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
ISSUER = {"issuer": {"addresses": ["10.0.0.5:15012"]}}  # identity.mode issuer (the default) needs them
KEPT = {"node.name", "node.address", "capture.mode", "identity.issuer"}  # their defaults are not valid here


def _default(section: str, key: str):
    value = getattr(Config(), section)
    return getattr(value, key) if key is not None else value


def document_from(genome: bytes) -> dict:
    """A config mapping read off ``genome``: per entry a section byte, a setting byte, a value byte.

    Mostly valid, to get deep: what validate requires is there (seven in eight), and every other
    setting gets its own default (or for a number, one a little above it). One document in three has one near
    miss: an entry whose value is one of the PALETTE's edge cases, an unknown section or setting, or
    a section that is not a mapping."""
    doc: dict = ({"node": dict(NODE), "capture": {"mode": "none"}, "identity": dict(ISSUER)}
                 if genome[:1] and genome[0] % 8 else {})
    sections = sorted(SECTIONS)
    entries = range(1, len(genome) - 2, 3)
    miss_at = entries[genome[-1] % len(entries)] if entries and genome[-1] % 3 == 0 else None
    for i in entries:
        section, value = sections[genome[i] % len(sections)], PALETTE[genome[i + 2] % len(PALETTE)]
        if i == miss_at:
            kind = genome[i + 1] % 8
            if kind == 0:
                doc[f"bogus{genome[i]}"] = value
            elif kind == 1 and SECTIONS[section]:
                doc[section] = value  # a section that is not a mapping (when value is not a dict)
            elif kind == 2 and SECTIONS[section]:
                doc.setdefault(section, {})[f"unknown{genome[i + 1]}"] = value
            elif SECTIONS[section]:
                doc.setdefault(section, {})[SECTIONS[section][genome[i + 1] % len(SECTIONS[section])]] = value
            else:
                doc[section] = value
            continue
        if section in SCALARS:
            doc[section] = _default(section, None)
            continue
        entry = doc.setdefault(section, {})
        if not isinstance(entry, dict):
            continue
        key = SECTIONS[section][genome[i + 1] % len(SECTIONS[section])]
        if f"{section}.{key}" in KEPT:
            continue
        default = _default(section, key)
        bump = genome[i + 2] % 2 and type(default) in (int, float) and default > 0
        entry[key] = default + 1 if bump and type(default) is int else default * 1.5 if bump else default
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


def check(build, named: set[str] | None = None) -> bool:
    """Validate; a refusal must name a field (one of ``named``, the settings and sections the input
    set, when given), an acceptance must be sound. True if accepted."""
    try:
        config = validate(build())
    except ConfigError as exc:
        assert exc.field and str(exc)
        for problem in problems_of(exc):  # a config with several problems names each (ConfigErrors)
            assert problem.field and problem.field in str(exc)
            if named is not None:
                assert problem.field in named or problem.field.split(".")[0] in named \
                    or problem.field.split(".")[-1] in named or problem.field in REQUIRED_FIELDS, \
                    (problem.field, sorted(named))
        return False
    assert_sound(config)
    return True


REQUIRED_FIELDS = {"node.name", "node.address", "admin.address", "capture.redirect_address", "identity.issuer.addresses"}


def named_in(doc: dict) -> set[str]:
    names = set(doc)
    for section, entry in doc.items():
        if isinstance(entry, dict):
            names |= {f"{section}.{key}" for key in entry} | {str(key) for key in entry}
    return names


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=1, max_size=90))
def test_mappings_are_refused_by_field_or_give_a_sound_config(genome):
    doc = document_from(genome)
    check(lambda: config_from_mapping(doc), named_in(doc))


def test_the_generator_mostly_builds_valid_configs():
    """Seeded: a loader that refused everything would fail here."""
    rng = random.Random(21)
    accepted = sum(check(lambda: config_from_mapping(doc), named_in(doc))
                   for doc in (document_from(rng.randbytes(rng.randint(1, 90))) for _ in range(3_000)))
    assert accepted >= 0.5 * 3_000, accepted  # 66 % measured


ENV_NAMES = [f"{ENV_PREFIX}{top}_{sub}".upper() for top, subs in SECTIONS.items() if subs for sub in subs] + \
            [f"{ENV_PREFIX}{name}".upper() for name in SCALARS]
STRINGS = [v for v in PALETTE if isinstance(v, str)] + ["5", "2.5", "30", "15008", "0.5", "3600", "1024", "1" * 400]


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(min_size=2, max_size=40))
def test_environment_overrides_are_refused_by_name_or_give_a_sound_config(genome):
    environ = {ENV_NAMES[genome[i] % len(ENV_NAMES)]: STRINGS[genome[i + 1] % len(STRINGS)]
               for i in range(0, len(genome) - 1, 2)}
    base = config_from_mapping({"node": dict(NODE), "capture": {"mode": "none"}, "identity": dict(ISSUER)})
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
