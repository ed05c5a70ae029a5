"""One-time bootstrap tokens: how a new node gets its first node credential (docs/identity.md).

A token is ``tmbt1.<node>.<expiry unix s>.<id: 32 hex>.<mac: 64 hex>``, the MAC an HMAC-SHA256 with
the issuer's token key over everything before it. Any replica verifies one alone (the key is shared
like the CA key); it is bound to one node name and expires (at most ``MAX_TOKEN_TTL_SECONDS``).

One-time across stateless replicas: the first replica to accept a token *claims* its id in the
spent-token ledger — a directory shared by the replicas (a host directory for the systemd unit and
the lab; a ReadWriteMany volume, or one replica, on Kubernetes) where a claim is an
``open(O_CREAT|O_EXCL)`` of ``<id>``: atomic on one filesystem, so exactly one claim succeeds,
whichever replica makes it; every later use is ``replayed_token``. A claim is kept until the token's
expiry (after which the token is refused as expired anyway) and then pruned, so the ledger stays
small and never needs a database. Verification order: MAC (bad_token), node (wrong_node), expiry
(expired_token), then the claim (replayed_token) — a forged or expired token never spends a slot.

Stdlib only (hmac, os); touches the key file and the ledger directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import TcpmeshError
from agent.identity.spiffe import SpiffeIdError, validate_node_name
from agent.filetrust import UntrustedFileError, check_trusted_file

PREFIX = "tmbt1"
MAX_TOKEN_TTL_SECONDS = 24 * 3600
DEFAULT_TOKEN_TTL_SECONDS = 900
_TOKEN = re.compile(r"^tmbt1\.([a-z0-9._-]{1,63})\.([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})$")


class TokenError(TcpmeshError):
    """A token key or ledger that cannot be used (names the file and the fix)."""


class TokenRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Claim:
    token_id: str
    node: str
    expires: int


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).hexdigest()


def make_token(key: bytes, node: str, now: float, ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS) -> str:
    try:
        validate_node_name(node)
    except SpiffeIdError as exc:
        raise TokenError(str(exc)) from None
    if not 1 <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
        raise TokenError(f"token TTL {ttl_seconds}s is out of range; use 1 to {MAX_TOKEN_TTL_SECONDS} seconds")
    body = f"{PREFIX}.{node}.{int(now) + ttl_seconds}.{secrets.token_hex(16)}"
    return f"{body}.{_mac(key, body)}"


def verify_token(key: bytes, token: str, node: str, now: float) -> Claim:
    """The token's claim if its MAC verifies, it names ``node`` and has not expired; ``TokenRefused`` otherwise."""
    match = _TOKEN.match(token) if isinstance(token, str) else None
    if match is None:
        raise TokenRefused("bad_token", "the bootstrap token is malformed; create one with `tcpmesh issuer token <node>`")
    body = token.rsplit(".", 1)[0]
    if not hmac.compare_digest(_mac(key, body), match.group(4)):
        raise TokenRefused("bad_token", "the bootstrap token was not made with this issuer's token key")
    if match.group(1) != node:
        raise TokenRefused("wrong_node", f"the bootstrap token was issued for node {match.group(1)!r}, not {node!r}")
    expires = int(match.group(2))
    if now >= expires:
        raise TokenRefused("expired_token", "the bootstrap token has expired; create a new one with "
                           f"`tcpmesh issuer token {node}`")
    return Claim(match.group(3), node, expires)


class SpentLedger:
    """The shared directory of spent token ids (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TokenError(f"tokens.spent_dir {self.directory}: cannot create it ({exc.strerror}); point it at a "
                             "directory the issuer may write, shared by every replica") from None

    def claim(self, claim: Claim, now: float) -> bool:
        """True for the first claim of this token id anywhere; False if it was spent already."""
        self._prune(now)
        path = self.directory / claim.token_id
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{claim.node} {claim.expires}\n".encode("ascii"))
        finally:
            os.close(fd)
        return True

    def _prune(self, now: float) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            try:
                expires = int(Path(entry.path).read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if expires < now:
                Path(entry.path).unlink(missing_ok=True)


def create_token_key(path: str | Path) -> None:
    """Write a new 32-byte token key (hex) to ``path``, mode 0600; refuses to replace one."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise TokenError(f"{path} exists; every token made with it would stop verifying if it were replaced. "
                         "Delete it first on purpose") from None
    except OSError as exc:
        raise TokenError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
    finally:
        os.close(fd)


def load_token_key(path: str | Path) -> bytes:
    path = Path(path)
    try:
        check_trusted_file(path, "tokens.key_file", secret=True)   # owner and directory too, not only the mode
    except UntrustedFileError as exc:
        raise TokenError(str(exc)) from None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except OSError as exc:
        raise TokenError(f"tokens.key_file {path}: cannot read it ({exc.strerror}); create it with "
                         f"`tcpmesh issuer token-key --out {path}`") from None
    if mode & 0o077:
        raise TokenError(f"tokens.key_file {path} has mode {mode:04o}: group or others may read the token key; "
                         f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise TokenError(f"tokens.key_file {path} does not hold a hex key of 32 bytes; create a new one with "
                         f"`tcpmesh issuer token-key --out {path}`")
    return key
