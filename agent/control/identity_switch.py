"""``identity.reload``: switch a running agent's SVID source to the ``identity.mode`` its config file says now.

The migration from node intermediates to the issuer without a restart (docs/identity.md "Migrating to
the issuer"): the operator edits the config file (``identity.mode: issuer`` and ``identity.issuer.*``)
— so a later restart comes up in the same mode, the file stays the one truth — and runs
``tcpmesh identity reload``. ``reload_identity`` re-reads the file, builds the new source and hands it
to ``IdentityRotator.switch_source``: the node joins the issuer (bootstrap token, node credential or
attestation, as at a start), every local identity's SVID is re-issued from the new source, and only
then the store swaps its TLS contexts. Open tunnels and streams keep the certificates they were made
with; new ones use the new SVIDs. Any failure leaves the agent exactly as it was.

Only ``identity.mode`` switches at runtime; the other settings of the file (and ``identity``'s other
fields when the mode did not change) apply at the next restart, and the answer says so.
Part of agent.control (it reads the config file, which sits above agent.identity); imports the issuer's
node side only when switching to it; never ``cryptography`` (the agent does not load it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from agent.config import Config, load_config
from agent.errors import TcpmeshError
from agent.identity.errors import IdentityError

log = logging.getLogger("tcpmesh.identity")


class IdentityReloadRefused(TcpmeshError):
    """The switch did not happen; the agent serves on as before (the message says why and the fix)."""


async def reload_identity(config_path: str, running: Config, rotator: Any, metrics: Any = None) -> tuple[Config, dict]:
    """Switch ``rotator`` to the identity mode of ``config_path``; the config now in force and the answer.

    ``IdentityReloadRefused`` when the file cannot be read, names another node or trust domain, or the
    new source cannot load or issue (nothing changed then)."""
    mode = running.identity.mode
    stay = f"nothing changed: node {running.node.name} stays on identity.mode {mode}, serving its current SVIDs"
    if not config_path:
        raise IdentityReloadRefused(f"this agent was started without a config file to re-read; {stay}")
    try:
        fresh = load_config(config_path)
    except TcpmeshError as exc:
        raise IdentityReloadRefused(f"{config_path}: {exc}; {stay}") from None
    for name, old, new in (("node.name", running.node.name, fresh.node.name),
                           ("trust_domain", running.trust_domain, fresh.trust_domain)):
        if old != new:
            raise IdentityReloadRefused(f"{config_path}: {name} is {new!r} but this agent runs as {old!r}; a reload "
                                        f"switches identity.mode only — put {name} back, or restart the agent; {stay}")
    wanted = fresh.identity.mode
    if wanted == mode:
        later = [f.name for f in dataclasses.fields(fresh.identity)
                 if getattr(fresh.identity, f.name) != getattr(running.identity, f.name)]
        note = (f"identity.mode is {mode} in {config_path} as in the running agent: nothing to switch"
                + (f"; changed identity settings ({', '.join(later)}) apply at the next restart" if later else ""))
        return running, {"switched": False, "mode": mode, "message": note}
    if wanted == "issuer":
        from agent.issuer.node_side import issuer_source

        source = issuer_source(fresh, metrics)
    else:
        from agent.identity.svid_rotator import ca_source

        source = ca_source(fresh)
    started = time.monotonic()
    log.warning("identity.reload: switching node %s from identity.mode %s to %s (%s)", running.node.name, mode,
                wanted, config_path)
    try:
        signing = await rotator.switch_source(source)
    except IdentityError as exc:
        log.error("identity.reload: switching to identity.mode %s failed: %s; %s", wanted, exc, stay)
        raise IdentityReloadRefused(f"switching to identity.mode {wanted} failed: {exc}; {stay}. Fix "
                                    f"identity.{'issuer' if wanted == 'issuer' else 'node_ca_dir'} in "
                                    f"{config_path} (or its files) and run `tcpmesh identity reload` again") from None
    except Exception as exc:  # e.g. an OSError writing the credential: the store swaps last, so still nothing changed
        log.exception("identity.reload: switching to identity.mode %s failed unexpectedly; %s", wanted, stay)
        raise IdentityReloadRefused(f"switching to identity.mode {wanted} failed: {type(exc).__name__}: {exc} (the "
                                    f"agent's log has the details); {stay}") from None
    seconds = time.monotonic() - started
    identities = len(rotator.store.svids())
    log.warning("identity.reload: node %s now on identity.mode %s (%s), %d SVIDs re-issued in %.2fs", running.node.name,
                wanted, signing.kind, identities, seconds)
    answer = {"switched": True, "from": mode, "mode": wanted, "kind": signing.kind, "identities": identities,
              "seconds": round(seconds, 3),
              "message": f"switched from identity.mode {mode} to {wanted} in {seconds:.2f}s: {identities} SVIDs "
                         f"re-issued; open connections keep their certificates. {config_path} already says "
                         f"identity.mode {wanted}, so a restart stays on it"}
    return dataclasses.replace(running, identity=fresh.identity), answer
