"""What changed between the config in force and the config file now, and which changes a running agent can take.

``changes(running, fresh)`` lists every leaf setting that differs (dotted name, old value, new value);
``split`` sorts them into those applied at runtime (``RUNTIME_FIELDS``: the identity source's
settings, through ``IdentityRotator.switch_source``, and ``config_file.*``) and those that need a
restart; ``merged`` is the running config with the applied ones taken over, so a setting that waits
for a restart keeps being reported until the agent restarts. ``restart_hint`` says how to restart
where this agent runs. Pure: no I/O; imports only ``dataclasses``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

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


def split(found: Iterable[Change]) -> tuple[list[Change], list[Change]]:
    """(applied at runtime, needing a restart)."""
    found = list(found)
    return [c for c in found if c.field in RUNTIME_FIELDS], [c for c in found if c.field not in RUNTIME_FIELDS]


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
