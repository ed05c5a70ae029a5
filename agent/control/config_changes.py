"""What changed between the config in force and the config file now, and which changes a running agent can take.

``changes(running, fresh)`` lists every leaf setting that differs (dotted name, old value, new value);
``split`` sorts them into those applied at runtime (``RUNTIME_FIELDS``: the identity source's
settings, through ``IdentityRotator.switch_source``, and ``config_file.*``) and those that need a
restart; ``merged`` is the running config with the applied ones taken over, so a setting that waits
for a restart keeps being reported until the agent restarts. ``restart_hint`` says how to restart
where this agent runs. ``reload_environment``: the environment a reload reads the file with — the unit's as
systemd reads it now when `systemctl reload` asks (ExecReload, the same invocation), else the agent's own.
``summary`` is the one line a reload says of it all. Pure: no I/O; imports only ``dataclasses``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# The identity source's settings: a change builds a new source and switches to it (all or nothing).
IDENTITY_SOURCE_FIELDS = frozenset({
    "identity.mode", "identity.node_ca_dir", "identity.ca_dir", "identity.issuer.addresses",
    "identity.issuer.credential_dir", "identity.issuer.ca_bundle", "identity.issuer.bootstrap_token_file",
    "identity.issuer.service_account_token_file", "identity.issuer.timeout_seconds"})
# The watch's own settings: read by the watch at each poll.
WATCH_FIELDS = frozenset({"config_file.watch", "config_file.poll_seconds"})
RUNTIME_FIELDS = IDENTITY_SOURCE_FIELDS | WATCH_FIELDS
DAEMONSET_RESTART = "kubectl -n tcpmesh-system rollout restart ds/tcpmesh-agent"
SYSTEMD_RESTART = "systemctl restart tcpmesh-agent"
INVOCATION_ID = "INVOCATION_ID"  # systemd's id of this run of the unit, in the environment of each of its processes


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.field} {self.old!r} → {self.new!r}"

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


def changes(running: Any, fresh: Any, prefix: str = "") -> list[Change]:
    """Every leaf field of the dataclass ``fresh`` whose value differs from ``running``'s, in field order."""
    found: list[Change] = []
    for f in dataclasses.fields(running):
        old, new = getattr(running, f.name), getattr(fresh, f.name)
        if dataclasses.is_dataclass(old):
            found += changes(old, new, f"{prefix}{f.name}.")
        elif old != new:
            found.append(Change(f"{prefix}{f.name}", old, new))
    return found


def split(found: Iterable[Change], from_environment: Iterable[str] = ()) -> tuple[list[Change], list[Change]]:
    """(applied at runtime, needing a restart). A field ``from_environment`` (set by a variable that changed in the
    unit's environment) waits for a restart too: a later `tcpmesh identity reload` from a shell reads the file
    with the agent's own environment, and would switch it back."""
    found, pinned = list(found), set(from_environment)
    runtime = [c for c in found if c.field in RUNTIME_FIELDS and c.field not in pinned]
    return runtime, [c for c in found if c not in runtime]


def reload_environment(sent: Any, own: Mapping[str, str],
                       variables: Mapping[str, str]) -> tuple[dict[str, str] | None, list[Change]]:
    """The environment a reload reads the file with, and the config variables that differ from ``own`` (the
    agent's, as it started). ``sent``: what `tcpmesh identity reload` sent of its own environment —
    ``{"invocation_id": ..., "variables": {TCPMESH_<SECTION>_<FIELD>: value}}`` — taken only from the unit's
    ExecReload, whose INVOCATION_ID is the agent's (systemd read /etc/default/tcpmesh anew for it); a reload
    from a shell (no or another id) reads with ``own`` (None). ``variables``: the config-field variable names
    (agent.config.environment_fields). ValueError: ``sent`` is not of that shape."""
    if sent is None:
        return None, []
    names = sent.get("variables") if isinstance(sent, dict) else None
    if not isinstance(names, dict) or not isinstance(sent.get("invocation_id"), str) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ValueError("unit_environment must be {invocation_id: str, variables: {str: str}}")
    if not own.get(INVOCATION_ID) or sent["invocation_id"] != own[INVOCATION_ID]:
        return None, []
    unknown = sorted(set(names) - set(variables))
    if unknown:
        raise ValueError(f"unit_environment names {', '.join(unknown)}, which set no config field")
    environ = {k: v for k, v in own.items() if k not in variables} | names
    changed = [Change(name, own.get(name), names.get(name)) for name in sorted(variables)
               if own.get(name) != names.get(name)]
    return environ, changed


def summary(config_path: str, applied: list[Change], restart: list[Change], environment: list[Change],
            registry_source: str) -> str:
    """What a reload took from ``config_path`` (and the unit's environment): applied, and waiting for a restart
    with the command that restarts the agent here."""
    source = config_path
    if environment:
        source += " and the unit's environment (" + ", ".join(
            f"{c.field} {'unset' if c.old is None else repr(c.old)} → {'unset' if c.new is None else repr(c.new)}"
            for c in environment) + ")"
    if not applied and not restart:
        return f"{source}: no change from the running config"
    parts = [f"applied: {', '.join(c.describe() for c in applied)}"] if applied else []
    if restart:
        parts.append(f"needs a restart: {', '.join(c.describe() for c in restart)} — the agent runs on with the old "
                     f"values until {restart_hint(registry_source)}")
    return f"{source}: {'; '.join(parts)}"


def merged(running: Any, applied: Iterable[Change]) -> Any:
    """``running`` with each applied change's new value set (nested frozen dataclasses rebuilt)."""
    for change in applied:
        running = _set(running, change.field.split("."), change.new)
    return running


def _set(obj: Any, path: list[str], value: Any) -> Any:
    head, rest = path[0], path[1:]
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value) if rest else value})


def restart_hint(registry_source: str) -> str:
    """How an operator restarts this agent: the DaemonSet's rollout, or the systemd unit."""
    if registry_source == "kubernetes":
        return f"`{DAEMONSET_RESTART}` (each node's flows end as its pod restarts)"
    return f"`{SYSTEMD_RESTART}` (the node's flows end)"
