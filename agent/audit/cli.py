"""``tcpmesh audit verify FILE...``: check that an access/audit log was not changed, cut or reordered."""

from __future__ import annotations

import sys

import click

from agent.audit.verify import verify_files


@click.group()
def audit() -> None:
    """Work with the access/audit log (hash-chained JSON lines)."""


@audit.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def verify(files: tuple[str, ...]) -> None:
    """Verify FILES as one chain, oldest first (e.g. access.log.1 access.log).

    Exit 0 when every record is intact and in order; exit 1 naming the first record that was
    changed, removed or reordered.
    """
    result = verify_files(list(files))
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.finding is not None:
        click.echo(f"FAILED ({result.finding.kind}): {result.finding.message}")
        click.echo(f"{result.records} record(s) before it verified", err=True)
        sys.exit(1)
    if result.records == 0:
        click.echo("OK: no records")
        return
    click.echo(f"OK: {result.records} records, seq {result.first_seq}..{result.last_seq}, head {result.head}")
