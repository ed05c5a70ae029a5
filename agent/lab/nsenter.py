"""Run code inside a named network namespace, and start processes inside a netns and a cgroup.

Network namespaces belong to threads, not processes: ``run_in_netns`` runs a callable on a fresh,
dedicated thread that first calls libc ``setns(CLONE_NEWNET)`` and then dies, so the caller's thread
never changes namespace. A socket keeps the namespace it was created in, so ``socket_in_netns``
returns a socket usable from any thread; ``connect_in_netns`` and ``http_get_in_netns`` build on it.

``preexec`` returns a ``subprocess.Popen(preexec_fn=…)`` hook that joins a cgroup and then a netns in
the child before exec — cgroup first, because cgroup BPF hooks bind to a socket when it is created.
Python 3.11 has no ``os.setns``, hence ctypes.

Owns only namespace entry; knows nothing about labs.
"""

from __future__ import annotations

import ctypes
import errno
import http.client
import os
import socket
import subprocess
import threading
import urllib.parse
from typing import Any, Callable, TypeVar

from agent.errors import KernelError, TcpmeshError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
T = TypeVar("T")

_libc = None


def _setns_function():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.setns


def netns_path(netns: str) -> str:
    """``/run/netns/<name>`` for a name; an absolute path (e.g. /proc/<pid>/ns/net) is used as is."""
    return netns if netns.startswith("/") else f"{NETNS_RUN_DIR}/{netns}"


def open_netns(netns: str) -> int:
    try:
        return os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TcpmeshError(f"network namespace {netns!r} does not exist ({netns_path(netns)} is missing): "
                           "is the lab up? see `tcpmesh lab status`") from exc


def setns_current_thread(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if _setns_function()(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise KernelError("setns(CLONE_NEWNET)", f"fd {fd}", err, "needs CAP_SYS_ADMIN")


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` on a new thread inside ``netns``; return its result or raise its error."""
    fd = open_netns(netns)
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            setns_current_thread(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread, re-raised there
            outcome["error"] = exc

    try:
        thread = threading.Thread(target=body, name=f"netns:{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def socket_in_netns(netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
                    proto: int = 0) -> socket.socket:
    """A new socket that lives in ``netns`` (and stays there whichever thread uses it)."""
    return run_in_netns(netns, socket.socket, family, type, proto)


def connect_in_netns(netns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside ``netns``. The caller closes it."""
    sock = socket_in_netns(netns)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_in_netns(netns: str, address: tuple[str, int], backlog: int = 16) -> socket.socket:
    """A listening TCP socket bound inside ``netns``. The caller closes it."""
    sock = socket_in_netns(netns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        self.sock = connect_in_netns(self._netns, (self.host, self.port), self.timeout)


def http_get_in_netns(netns: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url`` (plain http) from inside ``netns``; returns (status, body)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"http_get_in_netns needs an http:// URL with a host, got {url!r}")
    conn = _NetnsHTTPConnection(netns, parts.hostname, parts.port or 80, timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def preexec(netns: str | None = None, cgroup: str | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that puts the child into ``cgroup`` (a v2 directory) and then into ``netns``.

    Everything that can fail slowly (opening files, loading libc) happens here, in the parent; the
    returned hook only does os.write and setns. The netns fd is close-on-exec, so the program does not
    inherit it. The parent keeps the fd open until the hook object is garbage collected.
    """
    setns = _setns_function()
    procs = f"{cgroup.rstrip('/')}/cgroup.procs" if cgroup else None
    if procs is not None and not os.path.exists(procs):
        raise TcpmeshError(f"cgroup {cgroup!r} does not exist: is the lab up? see `tcpmesh lab status`")
    hook = _Preexec(open_netns(netns) if netns else None, procs, setns)
    return hook


class _Preexec:
    def __init__(self, fd: int | None, procs: str | None, setns) -> None:
        self.fd = fd
        self.procs = procs
        self._setns = setns

    def __call__(self) -> None:
        if self.procs is not None:
            cg = os.open(self.procs, os.O_WRONLY)
            try:
                os.write(cg, b"0")  # "0" is the writing process itself
            finally:
                os.close(cg)
        if self.fd is not None and self._setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno() or errno.EPERM, "setns(CLONE_NEWNET) failed")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def popen_in(argv: list[str], netns: str | None = None, cgroup: str | None = None,
             **popen_kwargs: Any) -> "subprocess.Popen":
    """``subprocess.Popen(argv, **popen_kwargs)`` with the child in ``cgroup`` and ``netns``."""
    hook = preexec(netns, cgroup)
    try:
        return subprocess.Popen(argv, preexec_fn=hook, **popen_kwargs)
    finally:
        hook.close()


def enter_in_process(netns: str | None = None, cgroup: str | None = None) -> None:
    """Move THIS process (single-threaded, about to exec) into ``cgroup`` and then ``netns``."""
    hook = preexec(netns, cgroup)
    try:
        hook()
    finally:
        hook.close()
