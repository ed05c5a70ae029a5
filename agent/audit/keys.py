"""The audit chain's MAC keys: one file of 256-bit keys, created 0600 at first start, rotated by appending.

The file holds one key per line, ``<key id> <64 hex digits>``; the last line is the key new records
are sealed with, the lines before it are retired keys kept so older records still verify. A key id
is derived from the key (the first 16 hex digits of SHA-256 over a label and the key), so a line whose
id does not match its key is refused, and a record names its key without revealing it.

The file must live outside the access log's directory (whoever can write the log must not be able to
replace the key) and must be readable by its owner only: a key file group or others can read or
write is refused, naming the file and the fix. Errors never quote the file's content.

Imports only the standard library, agent.errors and agent.safe_write.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field

from agent.errors import TcpmeshError
from agent.safe_write import replace_atomic, write_new

KEY_BYTES = 32
_ID_LABEL = b"tcpmesh audit key id\0"


class AuditKeyError(TcpmeshError):
    """The audit key file is missing, unreadable, malformed or too open. The message names the fix."""


@dataclass(frozen=True)
class AuditKey:
    id: str
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class Keyring:
    """Every key of a key file by id; ``current`` seals new records."""
    keys: tuple[AuditKey, ...]

    @property
    def current(self) -> AuditKey:
        return self.keys[-1]

    def get(self, key_id: str) -> AuditKey | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def merged(self, other: "Keyring") -> "Keyring":
        return Keyring(self.keys + tuple(k for k in other.keys if self.get(k.id) is None))


def key_id(secret: bytes) -> str:
    return hashlib.sha256(_ID_LABEL + secret).hexdigest()[:16]


def new_key() -> AuditKey:
    secret = secrets.token_bytes(KEY_BYTES)
    return AuditKey(key_id(secret), secret)


def _line(key: AuditKey) -> bytes:
    return f"{key.id} {key.secret.hex()}\n".encode()


def parse_keys(text: bytes, path: str) -> Keyring:
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.startswith(b"#"):
            continue
        parts = raw.split()
        try:
            secret = bytes.fromhex(parts[1].decode()) if len(parts) == 2 else b""
        except (ValueError, UnicodeDecodeError):
            secret = b""
        if len(secret) != KEY_BYTES or parts[0].decode(errors="replace") != key_id(secret):
            raise AuditKeyError(f"{path}:{number} is not an audit key line (<id> <64 hex digits> whose id matches "
                                "the key): restore the file from a backup, or move it away and let the agent "
                                "create a new one (records sealed with the old keys then no longer verify)") from None
        keys.append(AuditKey(parts[0].decode(), secret))
    if not keys:
        raise AuditKeyError(f"{path} holds no key: restore it from a backup, or remove it so the agent creates one")
    return Keyring(tuple(keys))


def read_keys(path: str, *, check_mode: bool = True) -> Keyring:
    """The keys of ``path``; refuses a key file that group or others can access (``check_mode``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuditKeyError(f"audit key file {path} does not exist: pass the key file the agent created "
                            "(access_log.key in its config)") from None
    except OSError as exc:
        raise AuditKeyError(f"cannot open the audit key file {path}: {exc.strerror} (a symlink is refused)") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AuditKeyError(f"audit key file {path} is not a regular file")
        if check_mode and mode & 0o077:
            raise AuditKeyError(f"audit key file {path} has mode {stat.S_IMODE(mode):04o}: group or others can "
                                f"access it; run `chmod 600 {path}` (and check who could have read it)")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return parse_keys(f.read(), path)
    finally:
        if fd >= 0:
            os.close(fd)


def ensure_keys(path: str) -> tuple[Keyring, bool]:
    """The key file's keys, creating it (directory 0700, file 0600) with one new key if it does not exist.
    Returns (keys, created)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        return read_keys(path), False
    except AuditKeyError:
        if os.path.lexists(path):
            raise
    key = new_key()
    try:
        write_new(path, _line(key), 0o600)
    except FileExistsError:  # another writer created it meanwhile
        return read_keys(path), False
    return Keyring((key,)), True


def add_key(path: str) -> AuditKey:
    """Rotation: append a new key to ``path`` (atomically: a 0600 temporary file renamed over it)."""
    existing = read_keys(path)
    key = new_key()
    text = b"".join(_line(k) for k in existing.keys) + _line(key)
    replace_atomic(path, text, 0o600)
    return key


def signature(path: str) -> tuple | None:
    """(inode, size, mtime) of the key file: changes when a key is added. Cheap enough to poll."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` lies in ``directory`` or below it (after resolving symlinks)."""
    real, base = os.path.realpath(path), os.path.realpath(directory)
    return real == base or real.startswith(base.rstrip("/") + "/")
