"""Who can change a file the issuer decides by: its owner and mode, and those of its directory. Only ``os.stat``.

The registry file decides which node gets which identity, the issuer directory's bundle and intermediates
who may vouch for a node and what is signed, the keys everything: whoever can write one of them is, in
effect, the issuer. A file passes only if root or the issuer's own user owns it, neither group nor others
may write it (nor, for a key, read it), and so is every directory above it up to ``/`` (as sshd's
StrictModes): owned by root or the issuer's user and not writable by group or others, unless it has the
sticky bit (``/tmp``, and Kubernetes Secret and ConfigMap volumes: others may add entries there but not
rename or replace ours). Every ancestor, not only the nearest: whoever may write a grandparent can rename
the parent away and put any directory (or a symlink to one) in its place. A symlink is followed and the
ancestors of its target are checked too. The error names the field, the file, the directory, its mode and
owner, and the chmod/chown fix.

Imports only ``agent.errors``; no cryptography, no sockets.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Iterable

from agent.errors import TcpmeshError


class UntrustedFileError(TcpmeshError):
    """A file (or its directory) the issuer decides by may be changed by someone other than root or the issuer."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def allowed_owners() -> frozenset[int]:
    """Root and the user the issuer runs as."""
    return frozenset({0, os.geteuid()})


def check_trusted_file(path: str | Path, field: str, *, secret: bool = False,
                       owners: Iterable[int] | None = None) -> None:
    """Raise ``UntrustedFileError`` unless only root or the issuer's user can change ``path`` (see the module
    docstring); ``secret``: a key, which group and others must not read either (mode 0600). A missing file is
    left to its reader's own message."""
    allowed = frozenset(owners) if owners is not None else allowed_owners()
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    wanted = "0600" if secret else "0644"
    problems = []
    if st.st_uid not in allowed:
        problems.append(f"it is owned by {_owner(st.st_uid)}, who may rewrite it")
    if mode & 0o022:
        problems.append("group or others may write it")
    if secret and mode & 0o044:
        problems.append("group or others may read it")
    if problems:
        fixes = []
        if st.st_uid not in allowed:
            fixes.append(f"`chown root {path}`")
        if mode & (0o066 if secret else 0o022):
            fixes.append(f"`chmod {wanted} {path}`")
        raise UntrustedFileError(
            f"{field} {path}: mode {mode:04o}, owner {_owner(st.st_uid)}, group {st.st_gid}: {' and '.join(problems)}"
            f" — whoever can change it decides what the issuer trusts, so the issuer refuses it; run "
            f"{' and '.join(fixes)} (and check who could have changed it)")
    for directory in ancestors(path):
        _check_directory(directory, field, path, allowed)


def ancestors(path: Path) -> list[Path]:
    """Every directory above ``path`` up to ``/``, nearest first: those of the path as written and, when a symlink
    is on the way, those of its target too (deduplicated)."""
    seen: dict[Path, None] = {}
    for start in (Path(os.path.abspath(path)), path.resolve()):
        for directory in start.parents:
            seen.setdefault(directory)
    return list(seen)


def _check_directory(directory: Path, field: str, path: Path, allowed: frozenset[int]) -> None:
    try:
        st = os.stat(directory)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    which = "its directory" if directory in (path.parent, path.resolve().parent) else "the directory above it"
    if st.st_uid not in allowed:
        raise UntrustedFileError(
            f"{field} {path}: {which} {directory} (mode {mode:04o}) is owned by {_owner(st.st_uid)}, who may "
            f"rename or replace what is under it; run `chown root {directory}` or move the file under directories "
            "root owns")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UntrustedFileError(
            f"{field} {path}: {which} {directory} has mode {mode:04o}, owner {_owner(st.st_uid)}: group or others "
            f"may rename or replace what is under it; run `chmod go-w {directory}` (or `chmod +t` if others must "
            "create files there) or move the file under directories only root may write")
