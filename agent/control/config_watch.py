"""Notice that the agent's config file changed — also when the kubelet swaps a ConfigMap's ``..data`` symlink.

A ConfigMap mounted as a directory holds ``config.yaml -> ..data/config.yaml`` and ``..data ->
..<timestamp>``; the kubelet writes a new ``..<timestamp>`` directory and renames a new ``..data`` link
over the old one (atomic), so the path never changes while the file behind it does. ``signature``
therefore follows the symlinks: the real path, device, inode, size and mtime of the file read — any
update (swap, editor rename, in-place write) changes it. ``ConfigWatch.run`` polls it every
``config_file.poll_seconds`` (a stat per poll: no inotify, which would have to watch the directory and
re-arm on every swap) and calls ``on_change`` once per new signature while ``config_file.watch`` is on;
when ``on_change`` answers True (the file is fine but could not apply yet: an issuer not answering),
the same version is tried again after ``RETRY_INITIAL_SECONDS``, doubling to ``RETRY_MAX_SECONDS``.
What a change does is the caller's (agent.app: the reload of agent.control.identity_switch).
Imports nothing of the agent; touches the file system with ``os.stat`` only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

log = logging.getLogger("tcpmesh.config")
RETRY_INITIAL_SECONDS = 10.0
RETRY_MAX_SECONDS = 300.0


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
                 on_change: Callable[[], Awaitable[bool]]) -> None:
        self.path = path
        self._enabled = enabled
        self._poll_seconds = poll_seconds
        self._on_change = on_change
        self.seen = signature(path)
        self._retry_at: float | None = None   # loop time of the next attempt at a version that failed to apply
        self._retry_delay = 0.0

    def remember(self) -> None:
        """The file is being read now (a reload by command): this version needs no second reload."""
        self.seen = signature(self.path)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._poll_seconds())
            if not self._enabled():
                continue
            now = signature(self.path)
            if now != self.seen:
                self.seen = now
                self._retry_at, self._retry_delay = None, 0.0
                log.info("config file %s changed (now %s): applying it", self.path, now[0])
            elif self._retry_at is None or loop.time() < self._retry_at:
                continue
            else:
                log.info("config file %s: trying again the version that could not apply", self.path)
            try:
                retry = await self._on_change()
            except Exception:  # the watch must outlive one bad reload; the reload itself reports its refusals
                log.exception("config file %s: the reload after a change failed unexpectedly", self.path)
                retry = False
            if retry:
                self._retry_delay = min(max(self._retry_delay * 2, RETRY_INITIAL_SECONDS), RETRY_MAX_SECONDS)
                self._retry_at = loop.time() + self._retry_delay
                log.warning("config file %s: trying it again in %.0fs (or at its next change)", self.path,
                            self._retry_delay)
            else:
                self._retry_at, self._retry_delay = None, 0.0
