"""``tcpmesh audit verify --key KEYFILE FILE...`` and ``tcpmesh audit rotate-key``: check that an
access/audit log was not changed, forged, cut or reordered; add a key to the key file."""

from __future__ import annotations

import sys

import click

from agent.audit.keys import Keyring, add_key, read_keys
from agent.audit.verify import verify_files
from agent.config import DEFAULT_ACCESS_LOG_KEY


@click.group()
def audit() -> None:
    """Work with the access/audit log (JSON lines chained with HMAC-SHA256)."""


@audit.command("verify")
@click.option("--key", "key_files", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="The agent's audit key file (access_log.key, e.g. /var/lib/tcpmesh/audit.key); repeat it for "
                   "key files of other nodes or older copies.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def verify(key_files: tuple[str, ...], files: tuple[str, ...]) -> None:
    """Verify FILES as one chain, oldest first (e.g. access.log.1 access.log).

    Exit 0 when every record is intact, sealed by a key of the key file(s) and in order; exit 1
    naming every record that was changed, forged, removed or reordered, and every break the agent
    itself found and recorded on start.
    """
    keys = Keyring(())
    for path in key_files:  # a verifier may hold a copy: the mode is the agent's concern, not checked here
        keys = keys.merged(read_keys(path, check_mode=False))
    result = verify_files(list(files), keys)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for entry in result.breaks:
        click.echo(f"break recorded by the agent at {entry.describe()}: it found {entry.detail or 'a broken chain'}",
                   err=True)
    for finding in result.findings:
        click.echo(f"FAILED ({finding.kind}): {finding.message}")
    if result.findings:
        click.echo(f"{len(result.findings)} problem(s); {result.records} intact record(s)", err=True)
        sys.exit(1)
    if result.records == 0:
        click.echo("OK: no records")
        return
    click.echo(f"OK: {result.records} records, seq {result.first_seq}..{result.last_seq}, head {result.head}")


@audit.command("rotate-key")
@click.option("--key", "key_file", default=DEFAULT_ACCESS_LOG_KEY, show_default=True, type=click.Path(dir_okay=False),
              help="The agent's audit key file (access_log.key).")
def rotate_key(key_file: str) -> None:
    """Add a new key to the key file; the agent seals with it from its next record on (within a second),
    after a `key` record sealed with the old key. Older keys stay in the file so older records verify."""
    key = add_key(key_file)
    click.echo(f"added key {key.id} to {key_file}; the running agent switches to it at its next record "
               "(a `key` record marks the change)")
