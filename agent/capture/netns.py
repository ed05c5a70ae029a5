"""Where the node-level plumbing of the ebpf-tc and iptables modes runs: this process's network
namespace (``netns=None``, how the agent runs), or a named one under /run/netns (tests, `doctor`
probes, `tcpmesh cleanup --netns`).

``ipr(netns)`` opens a pyroute2 IPRoute there; ``run(argv, netns)`` runs a command (nft, iptables)
there, joining the namespace in the child only, so the caller never changes namespace.
``netlink_call`` marks a function that uses ``ipr``: pyroute2's synchronous API drives an asyncio
loop of its own, which cannot run on a thread whose loop is already running (the agent calls
capture from its event loop), so there the function runs on a short-lived thread instead.
Knows nothing about capture; must not import bcc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
DEFAULT_TIMEOUT = 20.0


def netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"{NETNS_RUN_DIR}/{netns}"


T = TypeVar("T")


def netlink_call(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` on its own thread when the calling thread has a running asyncio loop."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        outcome: dict[str, Any] = {}

        def body() -> None:
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised on the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=body, name=f"netlink:{fn.__name__}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return wrapper


def describe(netns: str | None) -> str:
    return f"netns {netns}" if netns else "this netns"


@contextlib.contextmanager
def ipr(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute bound to ``netns`` (None: the caller's own namespace)."""
    with (IPRoute(netns=netns) if netns else IPRoute()) as handle:
        yield handle


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self) -> str:
        text = (self.stderr or self.stdout).strip().splitlines()
        return f"`{' '.join(self.argv)}` exited {self.returncode}: {' | '.join(text[-3:]) or 'no output'}"


class _EnterNetns:
    """preexec_fn: setns(CLONE_NEWNET) into an fd opened by the parent (nothing slow in the child)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._setns = ctypes.CDLL(None, use_errno=True).setns

    def __call__(self) -> None:
        if self._setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno() or errno.EPERM, "setns(CLONE_NEWNET) failed")


def run(argv: Sequence[str], netns: str | None = None, stdin: str | None = None,
        timeout: float = DEFAULT_TIMEOUT) -> Completed:
    """Run ``argv`` inside ``netns``. FileNotFoundError when the program is not installed."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC) if netns else None
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_EnterNetns(fd) if fd is not None else None)
    finally:
        if fd is not None:
            os.close(fd)
    return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
