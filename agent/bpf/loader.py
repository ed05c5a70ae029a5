"""Loading BPF, parent side: one request to a short-lived child process, one answer back. No bcc here.

The agent never imports bcc: libbcc maps libLLVM and clang (~75 MB resident before a compile, ~125 MB
after; docs/kernel-notes.md). ``load(request)`` starts ``python -m agent.bpf.child REQUEST_JSON FD``
with one end of a socketpair and reads its one answer from the other end:

    parent: load(LoadRequest)  ──  python -m agent.bpf.child REQUEST_JSON FD   (bcc only there)
            ◄── one message: JSON {"ok": true, "result": {...}} or {"ok": false, "error": {...}},
                with the loaded programs' and maps' fds attached (SCM_RIGHTS)

A request either asks for the fds (ebpf-tc: a tc filter keeps its program, and the program its maps,
alive) or, with ``pin_to``, for the programs pinned as one set in bpffs (ebpf-connect, the kernel TCP
stats: the pins keep them alive across agent restarts; then no fd comes back). ``probe=True`` (doctor)
reports a program the verifier refuses in ``Loaded.failed`` instead of failing the whole request.
Errors come back typed: BpfLoadError with the compiler/verifier log, BccMissing, EnvironmentProblem;
anything else is LoaderFailed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from agent.bpf import sources
from agent.bpf.errors import BccMissing, BpfLoadError, LoaderFailed
from agent.errors import EnvironmentProblem, TcpmeshError

DEFAULT_TIMEOUT = 120.0
MAX_MESSAGE = 1 << 20
MAX_FDS = 64
MAX_LOG = 64 * 1024  # the child sends at most this much compiler/verifier log (all of it goes to its stderr)


class Program(NamedTuple):
    name: str            # the C function
    prog_type: int       # BPF_PROG_TYPE_*
    attach_type: int = -1  # expected attach type (BPF_CGROUP_*), -1 for none


@dataclass(frozen=True)
class PinTo:
    """Pin the programs as one set: ``<bpffs_dir>/<set_name>/<program>``, complete or absent."""

    bpffs_dir: str
    set_name: str
    maps_name: str  # the maps directory the C pins its maps in (-DTCPMESH_MAPS_DIR); created if missing


@dataclass(frozen=True)
class LoadRequest:
    source: str                          # the main C file
    cflags: tuple[str, ...]
    state_dir: str                       # where the kernel stub tree is materialised
    programs: tuple[Program, ...]
    maps: tuple[str, ...] = ()           # hand these maps' fds back too (not with pin_to)
    pin_to: PinTo | None = None
    probe: bool = False                  # a program that fails to load goes to Loaded.failed, not raised

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadRequest:
        doc = json.loads(text)
        return cls(doc["source"], tuple(doc["cflags"]), doc["state_dir"], tuple(Program(*p) for p in doc["programs"]),
                   tuple(doc["maps"]), PinTo(**doc["pin_to"]) if doc.get("pin_to") else None, bool(doc["probe"]))


@dataclass
class Loaded:
    """What the child did. ``programs``/``maps`` are fds owned by the caller (empty with pin_to): close()."""

    compiled: bool             # False: pin_to found the set complete (another loader pinned it meanwhile)
    compile_seconds: float
    load_seconds: float
    max_rss_kb: int            # the child's peak RSS (what the agent does not carry)
    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # probe: program -> what the verifier said

    def close(self) -> None:
        for fd in [*self.programs.values(), *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.programs, self.maps = {}, {}

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load(request: LoadRequest, timeout: float = DEFAULT_TIMEOUT) -> Loaded:
    """Run the child for ``request``; raise the error it reports."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "agent.bpf.child", request.to_json(), str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=_child_env())
        finally:
            theirs.close()
        try:
            output, _ = proc.communicate(timeout=timeout)  # the answer waits in the socket meanwhile
        except subprocess.TimeoutExpired as exc:
            proc.kill()  # our own child
            proc.wait()
            raise LoaderFailed(f"the BPF loader child did not finish within {timeout:.0f}s") from exc
        ours.setblocking(False)
        try:
            data, fds, _, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            data, fds = b"", []
    text = output.decode(errors="replace")
    if not data:
        raise LoaderFailed(f"the BPF loader child exited with code {proc.returncode} without an answer; "
                           f"its output:\n{_tail(text)}")
    return _loaded(json.loads(data), fds, text)


def _loaded(answer: dict[str, Any], fds: list[int], output: str) -> Loaded:
    if not answer.get("ok"):
        _close(fds)
        raise _error_from(answer.get("error") or {}, output)
    result = answer["result"]
    names = list(result["programs"]) + list(result["maps"])
    if len(fds) != len(names):
        _close(fds)
        raise LoaderFailed(f"the BPF loader child sent {len(fds)} descriptors for {len(names)} objects")
    by_name = dict(zip(names, fds))
    return Loaded(result["compiled"], result["compile_seconds"], result["load_seconds"], result["max_rss_kb"],
                  {n: by_name[n] for n in result["programs"]}, {n: by_name[n] for n in result["maps"]},
                  dict(result["failed"]))


def _child_env() -> dict[str, str]:
    """The child imports this very agent package, wherever it is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (sources.package_root(), env.get("PYTHONPATH", "")) if p)
    return env


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def error_document(exc: BaseException) -> dict[str, Any]:
    """The child's side of ``_error_from``: what travels for each error type."""
    if isinstance(exc, BpfLoadError):
        return {"type": "BpfLoadError", "stage": exc.stage, "source": exc.source, "program": exc.program,
                "message": exc.message, "log": exc.log[-MAX_LOG:]}
    if isinstance(exc, BccMissing):
        return {"type": "BccMissing", "message": str(exc)}
    if isinstance(exc, EnvironmentProblem):
        return {"type": "EnvironmentProblem", "message": str(exc)}
    return {"type": type(exc).__name__, "message": str(exc)}


def _error_from(doc: dict[str, Any], output: str) -> TcpmeshError:
    kind = doc.get("type")
    message = doc.get("message", "unknown error")
    if kind == "BpfLoadError":
        return BpfLoadError(doc.get("stage", "load"), doc.get("source", ""), doc.get("program", ""), message,
                            doc.get("log", "") or output)
    if kind == "BccMissing":
        return BccMissing(message)
    if kind == "EnvironmentProblem":
        return EnvironmentProblem(message)
    return LoaderFailed(f"the BPF loader child failed: {kind}: {message}")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"
