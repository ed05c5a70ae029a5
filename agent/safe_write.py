"""Writing secret and trust files without a moment where they are partial, too open, or someone else's.

``write_new`` creates a file that must not exist yet (O_EXCL, never through a symlink: O_NOFOLLOW),
with ``mode`` enforced after the umask (fchmod), the whole content written and fsynced before close.
``replace_atomic`` writes a sibling temporary file that way, renames it over the target and fsyncs
the directory, so a reader sees the old file or the new one, and a crash leaves one of them.
Both raise OSError; callers turn it into their own typed error. Standard library only.
"""

from __future__ import annotations

import os
import secrets


def write_new(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Create ``path`` (FileExistsError if anything is there, a symlink too) holding ``data``, ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits; it can never have added any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Put ``data`` at ``path`` (``mode``) via a new temporary sibling renamed over it; none is left behind."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
