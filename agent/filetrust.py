"""Who can change a file a tcpmesh process decides by: its owner and mode, and those of every directory above it.

The issuer's registry file decides which node gets which identity, its bundle and intermediates who may vouch
for a node and what is signed, its keys everything; an agent's policy files decide who may connect: whoever
can write one of them is, in effect, that process. A file passes only if root or the process's own user owns
it, neither group nor others may write it (nor, for a key, read it), and so is every directory above it up to
``/`` (as sshd's StrictModes): owned by root or that user and not writable by group or others, unless it has the
sticky bit (``/tmp``, and Kubernetes Secret and ConfigMap volumes: others may add entries there but not
rename or replace ours). Every ancestor, not only the nearest: whoever may write a grandparent can rename
the parent away and put any directory (or a symlink to one) in its place. A symlink is followed and the
ancestors of its target are checked too. The error names the field, the file, the directory, its mode and
owner, and the chmod/chown fix. A file or directory on a read-only mount (a Kubernetes ConfigMap or Secret
volume mounted ``readOnly``) passes its own owner/mode check: nobody in this mount namespace can change it.

Imports only ``agent.errors``; no cryptography, no sockets. Only ``os.stat``/``os.statvfs``.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Iterable

from agent.errors import TcpmeshError


class UntrustedFileError(TcpmeshError):
    """A file (or a directory above it) a process decides by may be changed by someone other than root or it."""

    def __init__(self, field: str, path: Path, problem: str) -> None:
        self.field, self.path, self.problem = field, path, problem
        super().__init__(f"{field} {path}: {problem}")


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def allowed_owners() -> frozenset[int]:
    """Root and the user this process runs as."""
    return frozenset({0, os.geteuid()})


def check_trusted_file(path: str | Path, field: str, *, secret: bool = False,
                       owners: Iterable[int] | None = None, decides: str = "what the issuer trusts",
                       process: str = "the issuer") -> None:
    """Raise ``UntrustedFileError`` unless only root or this process's user can change ``path`` (see the module
    docstring); ``secret``: a key, which group and others must not read either (mode 0600). ``decides`` and
    ``process`` word the refusal ("whoever can change it decides <decides>, so <process> refuses it"). A
    missing file is left to its reader's own message."""
    allowed = frozenset(owners) if owners is not None else allowed_owners()
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    wanted = "0600" if secret else "0644"
    problems = []
    changeable = not _read_only_mount(path)
    if changeable and st.st_uid not in allowed:
        problems.append(f"it is owned by {_owner(st.st_uid)}, who may rewrite it")
    if changeable and mode & 0o022:
        problems.append("group or others may write it")
    if secret and mode & 0o044:
        problems.append("group or others may read it")
    if problems:
        fixes = []
        if changeable and st.st_uid not in allowed:
            fixes.append(f"`chown root {path}`")
        if mode & (0o066 if secret else 0o022):
            fixes.append(f"`chmod {wanted} {path}`")
        raise UntrustedFileError(
            field, path, f"mode {mode:04o}, owner {_owner(st.st_uid)}, group {st.st_gid}: {' and '.join(problems)}"
            f" — whoever can change it decides {decides}, so {process} refuses it; run "
            f"{' and '.join(fixes)} (and check who could have changed it)")
    for directory in ancestors(path):
        _check_directory(directory, field, path, allowed)


def ownership_fingerprint(paths: Iterable[Path]) -> bytes:
    """The owner, mode and mount flags of each path and of every directory above it: changes whenever
    ``check_trusted_file``'s answer could (a reader that reloads on content changes also reloads on a
    ``chmod``/``chown`` that fixes or breaks a file)."""
    seen: dict[Path, None] = {}
    for path in paths:
        seen.setdefault(Path(path))
        for directory in ancestors(Path(path)):
            seen.setdefault(directory)
    parts = []
    for path in seen:
        try:
            st = os.stat(path)
            parts.append(f"{path}:{st.st_mode:o}:{st.st_uid}:{int(_read_only_mount(path))}")
        except OSError as exc:
            parts.append(f"{path}:<{exc.errno}>")
    return "\n".join(parts).encode()


def ancestors(path: Path) -> list[Path]:
    """Every directory above ``path`` up to ``/``, nearest first: those of the path as written and, when a symlink
    is on the way, those of its target too (deduplicated)."""
    seen: dict[Path, None] = {}
    for start in (Path(os.path.abspath(path)), path.resolve()):
        for directory in start.parents:
            seen.setdefault(directory)
    return list(seen)


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_directory(directory: Path, field: str, path: Path, allowed: frozenset[int]) -> None:
    try:
        st = os.stat(directory)
    except OSError:
        return
    if _read_only_mount(directory):
        return
    mode = stat.S_IMODE(st.st_mode)
    which = "its directory" if directory in (path.parent, path.resolve().parent) else "the directory above it"
    if st.st_uid not in allowed:
        raise UntrustedFileError(
            field, path, f"{which} {directory} (mode {mode:04o}) is owned by {_owner(st.st_uid)}, who may "
            f"rename or replace what is under it; run `chown root {directory}` or move the file under directories "
            "root owns")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UntrustedFileError(
            field, path, f"{which} {directory} has mode {mode:04o}, owner {_owner(st.st_uid)}: group or others "
            f"may rename or replace what is under it; run `chmod go-w {directory}` (or `chmod +t` if others must "
            "create files there) or move the file under directories only root may write")
