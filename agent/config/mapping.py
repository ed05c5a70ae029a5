"""From a YAML mapping to the typed config (agent.config.model): ``config_from_mapping`` refuses every unknown key
and wrongly typed value at once, each named by its dotted field; ``coerce`` also turns a ``TCPMESH_*`` variable's
text into a field's value (agent.config.environment); the issuer's config is read the same way
(``build_dataclass``). Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import Any, Mapping

from agent.config.model import Config
from agent.errors import ConfigError, refused

_INTEGER = re.compile(r"[+-]?[0-9]+")


def config_from_mapping(doc: Any, source: str = "config") -> Config:
    if not isinstance(doc, dict):
        raise ConfigError(source, type(doc).__name__, "the config must be a YAML mapping")
    return _build(Config, doc, prefix="")


def _build(cls: type, doc: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` from the mapping ``doc``, or every unknown key and wrongly typed value of it at once (refused)."""
    errors: list[ConfigError] = []
    built = _build_into(cls, doc, prefix, errors)
    if errors:
        raise refused(errors)
    return built


def _build_into(cls: type, doc: Mapping[str, Any], prefix: str, errors: list[ConfigError]) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}" if isinstance(key, str) and key else f"{prefix}{key!r}"  # '' or 1 as a key: say so
        if key not in known:
            errors.append(ConfigError(name, value, "unknown setting", f"known settings here: {', '.join(sorted(known))}"))
            continue
        default = getattr(cls(), key)
        if is_dataclass(default) and not isinstance(value, dict):
            errors.append(ConfigError(name, value, "must be a mapping"))
        elif is_dataclass(default):
            values[key] = _build_into(type(default), value, f"{name}.", errors)
        else:
            try:
                values[key] = coerce(name, value, type(default))
            except ConfigError as exc:
                errors.append(exc)
    return cls(**values)


def coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2 ** 1023 else float("inf")  # float() raises OverflowError beyond
    if kind is int and isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)  # ASCII digits only: "--5" or "²" passed isdigit() and crashed int() (fuzzing found it)
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number")  # NaN slipped through every range check
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(name, value, f"must be of type {kind.__name__}", _TYPE_FIXES.get(kind, ""))
    return value


_TYPE_FIXES = {  # how to write each kind of value in YAML (or in a TCPMESH_* variable, for scalars)
    list: "write a YAML list, e.g. [a, b], or one '- item' per line below the key",
    int: "write a whole number without quotes or units, e.g. 15001",
    float: "write a number of seconds (or of the field's unit), e.g. 5 or 0.5",
    bool: "write true or false",
    str: "write a single value (quote it if it contains ': ' or starts with '[', '{' or '*'), not a list or mapping",
}


build_dataclass = _build  # the issuer's config (agent/issuer/config.py) is read the same way
