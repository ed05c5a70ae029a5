"""Notice that the agent's config file changed — also when the kubelet swaps a ConfigMap's ``..data`` symlink.

A ConfigMap mounted as a directory holds ``config.yaml -> ..data/config.yaml`` and ``..data ->
..<timestamp>``; the kubelet writes a new ``..<timestamp>`` directory and renames a new ``..data`` link
over the old one (atomic), so the path never changes while the file behind it does. ``signature``
therefore follows the symlinks: the real path, device, inode, size and mtime of the file read — any
update (swap, editor rename, in-place write) changes it. ``ConfigWatch.run`` polls it every
``config_file.poll_seconds`` (a stat per poll: no inotify, which would have to watch the directory and
re-arm on every swap) and calls ``on_change`` once per new signature while ``config_file.watch`` is on.
What a change does is the caller's (agent.app: the reload of agent.control.identity_switch).
Imports nothing of the agent; touches the file system with ``os.stat`` only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

log = logging.getLogger("tcpmesh.config")


def signature(path: str) -> tuple:
    """What identifies the file's current content cheaply; a missing file has a signature too (its errno)."""
    try:
        st = os.stat(path)  # follows config.yaml -> ..data/config.yaml -> ..<timestamp>/config.yaml
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        return ("unreadable", exc.errno)


class ConfigWatch:
    """Calls ``on_change`` when ``path``'s signature differs from the one last seen (``seen``)."""

    def __init__(self, path: str, *, enabled: Callable[[], bool], poll_seconds: Callable[[], float],
                 on_change: Callable[[], Awaitable[None]]) -> None:
        self.path = path
        self._enabled = enabled
        self._poll_seconds = poll_seconds
        self._on_change = on_change
        self.seen = signature(path)

    def remember(self) -> None:
        """The file is being read now (a reload by command): this version needs no second reload."""
        self.seen = signature(self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds())
            if not self._enabled():
                continue
            now = signature(self.path)
            if now == self.seen:
                continue
            self.seen = now
            log.info("config file %s changed (now %s): applying it", self.path, now[0])
            try:
                await self._on_change()
            except Exception:  # the watch must outlive one bad reload; the reload itself reports its refusals
                log.exception("config file %s: the reload after a change failed unexpectedly", self.path)
