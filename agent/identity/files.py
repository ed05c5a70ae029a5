"""The file names of CA directories, and the cheap change check the agent polls them with.

Pure stdlib (``os.stat``): the long-running agent imports this to notice a re-issued node
intermediate or a changed trust bundle, and ``write_file_atomic`` to write its node credential (issuer
mode; the CA commands write theirs with it too); reading and checking the files themselves is the minting
worker's (``minting_worker.py``), which may import cryptography. Must not import cryptography or ssl.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.identity.errors import CaError
from agent.safe_write import replace_atomic

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NODE_CERT_FILE = "node.crt"
NODE_KEY_FILE = "node.key"
BUNDLE_FILE = "bundle.pem"
NODE_CA_FILES = (NODE_CERT_FILE, NODE_KEY_FILE, BUNDLE_FILE)
ROOT_CA_FILES = (CA_CERT_FILE, CA_KEY_FILE)
# The issuer's directory (`tcpmesh ca issue-issuer`): its issuing intermediate, key, and the trust bundle.
ISSUER_CA_FILES = ("issuer.crt", "issuer.key", BUNDLE_FILE)
# The intermediate issuer.crt replaced (written by `ca issue-issuer` and `ca rotate reissue`): node SVIDs it signed
# stay node credentials while it chains to a root of the bundle (signing.IssuingCa checks signatures, not names).
ISSUER_PREVIOUS_CERT_FILE = "issuer-previous.crt"
# The roots `ca rotate remove-old` took out of the issuer's bundle (newest last, at most 8): a replica, also one
# started after the step, recognises a client certificate under one and refuses it by name (``removed_root``: the
# node missed the rotation, and the fix) rather than as an anonymous failed handshake. Trusted for nothing else.
ISSUER_REMOVED_ROOTS_FILE = "removed-roots.pem"
MAX_REMOVED_ROOTS = 8
# A node credential directory (`tcpmesh ca issue-node-credential`, then renewed by the agent): a client
# certificate spiffe://<td>/node/<name> (CA:false), its key, and the trust bundle. Holds no signing key.
CREDENTIAL_CERT_FILE = "credential.crt"
CREDENTIAL_KEY_FILE = "credential.key"
CREDENTIAL_FILES = (CREDENTIAL_CERT_FILE, CREDENTIAL_KEY_FILE, BUNDLE_FILE)


def files_signature(directory: str | Path, names: tuple[str, ...] = NODE_CA_FILES) -> tuple:
    """(inode, size, mode, mtime, ctime) of each CA file: changes whenever one is replaced or its mode
    changed. Cheap enough to poll."""
    result = []
    for name in names:
        try:
            st = os.stat(Path(directory) / name)
            result.append((st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            result.append(None)
    return tuple(result)


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file that is created with ``mode`` and renamed
    (agent.safe_write.replace_atomic: O_EXCL, O_NOFOLLOW, fsync of the file and the directory)."""
    try:
        replace_atomic(path, data, mode)
    except OSError as exc:
        raise CaError(f"cannot write {path}: {exc.strerror}; choose a directory you can write to") from None
