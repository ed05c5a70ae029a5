"""``identity.reload``: apply a running agent's config file again — above all switch its SVID source to the
``identity.mode`` its config file says now.

The migration from node intermediates to the issuer without a restart (docs/identity.md "Migrating to
the issuer"): the operator edits the config file (``identity.mode: issuer`` and ``identity.issuer.*``)
— so a later restart comes up in the same mode, the file stays the one truth — and runs
``tcpmesh identity reload``. ``reload_identity`` re-reads the file, builds the new source and hands it
to ``IdentityRotator.switch_source``: the node joins the issuer (bootstrap token, node credential or
attestation, as at a start), every local identity's SVID is re-issued from the new source, and only
then the store swaps its TLS contexts. Open tunnels and streams keep the certificates they were made
with; new ones use the new SVIDs. Any failure leaves the agent exactly as it was.

The identity source's settings switch at runtime (``config_changes.IDENTITY_SOURCE_FIELDS``: also a
new issuer address or node CA directory in the same mode); ``config_file.*`` is taken over; any other
changed field needs a restart, and the answer names it (old → new, and how to restart). The same
function serves the agent's own config watch (``config_file.watch``: a kubelet ConfigMap update) and SIGHUP;
`systemctl reload` (ExecReload) also hands it the unit's environment as systemd reads it now.
Part of agent.control (it reads the config file, which sits above agent.identity); imports the issuer's
node side only when switching to it; never ``cryptography`` (the agent does not load it).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from agent.config import Config, environment_fields, load_agent_config
from agent.control import config_changes
from agent.errors import TcpmeshError
from agent.identity.errors import IdentityError

log = logging.getLogger("tcpmesh.identity")


class IdentityReloadRefused(TcpmeshError):
    """The switch did not happen; the agent serves on as before (the message says why and the fix).
    ``retryable``: the file is fine but the new source failed (an issuer not answering yet) — the same
    file may apply later, so the config watch tries it again with backoff."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


async def reload_identity(config_path: str, running: Config, rotator: Any, metrics: Any = None,
                          unit_environment: Any = None) -> tuple[Config, dict]:
    """Apply ``config_path`` to the running agent; the config now in force and the answer.

    The identity source's settings (``config_changes.IDENTITY_SOURCE_FIELDS``: the mode, the issuer's
    addresses and files, the node CA directory) switch ``rotator`` to a source built from the file — all
    or nothing; ``config_file.*`` is taken over; every other changed field is named in
    ``restart_needed`` (old → new) and stays as it runs. ``unit_environment``: what `systemctl reload`'s
    command sent of the unit's environment (``config_changes.reload_environment``): the file is read with it, and
    a field a changed variable sets waits for a restart (named with the variable). ``IdentityReloadRefused``
    when the file cannot be read or does not validate, names another node or trust domain, or the new source
    cannot load or issue (nothing changed then, not even the fields that could have applied)."""
    mode = running.identity.mode
    stay = f"nothing changed: node {running.node.name} stays on identity.mode {mode}, serving its current SVIDs"
    if not config_path:
        raise IdentityReloadRefused(f"this agent was started without a config file to re-read; {stay}")
    variables = environment_fields()
    try:
        environ, environment = config_changes.reload_environment(unit_environment, os.environ, variables)
    except ValueError as exc:
        raise IdentityReloadRefused(f"{exc}; {stay}") from None
    try:
        fresh = load_agent_config(config_path, environ)
    except TcpmeshError as exc:
        raise IdentityReloadRefused(f"{exc}; {stay} and its last good config") from None  # exc names the file
    for name, old, new in (("node.name", running.node.name, fresh.node.name),
                           ("trust_domain", running.trust_domain, fresh.trust_domain)):
        if old != new:
            raise IdentityReloadRefused(f"{config_path}: {name} is {new!r} but this agent runs as {old!r}; a reload "
                                        f"cannot change it — put {name} back, or restart the agent; {stay}")
    applied, restart = config_changes.split(config_changes.changes(running, fresh),
                                            [variables[c.field] for c in environment])
    answer: dict[str, Any] = {"switched": False, "mode": mode, "applied": [c.to_json() for c in applied],
                              "restart_needed": [c.to_json() for c in restart],
                              "environment": [c.to_json() for c in environment]}
    said = config_changes.summary(config_path, applied, restart, environment, running.registry.source)
    source_changes = [c for c in applied if c.field in config_changes.IDENTITY_SOURCE_FIELDS]
    now = config_changes.merged(running, applied)  # the source is built from what applies, never a pinned field
    if not source_changes:
        answer["message"] = said
        return now, answer
    wanted = now.identity.mode
    if wanted == "issuer":
        from agent.issuer.node_side import issuer_source

        source = issuer_source(now, metrics)
    else:
        from agent.identity.svid_rotator import ca_source

        source = ca_source(now)
    started = time.monotonic()
    what = ", ".join(c.describe() for c in source_changes)
    log.warning("config reload: switching node %s's identity source (%s; %s)", running.node.name, what, config_path)
    try:
        signing = await rotator.switch_source(source)
    except IdentityError as exc:
        log.error("config reload: switching the identity source (%s) failed: %s; %s", what, exc, stay)
        raise IdentityReloadRefused(f"switching to identity.mode {wanted} ({what}) failed: {exc}; {stay}. Fix "
                                    f"identity.{'issuer' if wanted == 'issuer' else 'node_ca_dir'} in "
                                    f"{config_path} (or its files) and run `tcpmesh identity reload` again",
                                    retryable=True) from None
    except Exception as exc:  # e.g. an OSError writing the credential: the store swaps last, so still nothing changed
        log.exception("config reload: switching to identity.mode %s failed unexpectedly; %s", wanted, stay)
        raise IdentityReloadRefused(f"switching to identity.mode {wanted} failed: {type(exc).__name__}: {exc} (the "
                                    f"agent's log has the details); {stay}", retryable=True) from None
    seconds = time.monotonic() - started
    identities = len(rotator.store.svids())
    log.warning("config reload: node %s now on identity.mode %s (%s), %d SVIDs re-issued in %.2fs", running.node.name,
                wanted, signing.kind, identities, seconds)
    switched = f"switched from identity.mode {mode} to {wanted}" if wanted != mode else f"identity source switched ({what})"
    answer.update({"switched": True, "from": mode, "mode": wanted, "kind": signing.kind, "identities": identities,
                   "seconds": round(seconds, 3),
                   "message": f"{switched} in {seconds:.2f}s: {identities} SVIDs re-issued; open connections keep "
                              f"their certificates. {config_path} already says identity.mode {wanted}, so a restart "
                              f"stays on it. {said}"})
    return now, answer
