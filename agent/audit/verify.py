"""Verifying access/audit log files: read them (oldest first) and check the keyed chain (agent.audit.chain)."""

from __future__ import annotations

from agent.audit.chain import Entry, Verification, parse_line, verify_entries
from agent.audit.keys import Keyring
from agent.errors import TcpmeshError


def read_entries(path: str, keys: Keyring) -> list[Entry]:
    try:
        with open(path, "rb") as f:
            return [parse_line(raw, path, number, keys) for number, raw in enumerate(f, 1)]
    except OSError as exc:
        raise TcpmeshError(f"cannot read {path}: {exc.strerror or exc}") from exc


def verify_files(paths: list[str], keys: Keyring) -> Verification:
    """Verify ``paths`` as one chain, oldest first (e.g. access.log.2 access.log.1 access.log)."""
    entries: list[Entry] = []
    for path in paths:
        entries.extend(read_entries(path, keys))
    return verify_entries(entries)
