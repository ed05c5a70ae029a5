"""Compile and load BPF in a short-lived child process and hand the file descriptors back.

The agent must not map libbcc/libLLVM (~110 MB it would carry for its whole life; see the
ebpf-connect loader, agent.bpf.loader). The ebpf-tc mode needs no pinning — a tc filter keeps
its program, and the program its maps, alive — so its child simply sends the program and map fds
over a socketpair (SCM_RIGHTS) and exits:

    parent: load_fds(request)  ──  python -m agent.bpf.fdloader REQUEST_JSON FD  (bcc here)
            ◄── one message: JSON {"ok": ..., "programs": [...], "maps": [...], ...} + fds

Errors come back typed (BpfLoadError with the compiler/verifier log, BccMissing, ...). The parent
side imports no bcc.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from agent.bpf.errors import BccMissing, BpfLoadError, LoaderFailed
from agent.errors import EnvironmentProblem, TcpmeshError

DEFAULT_TIMEOUT = 120.0
MAX_MESSAGE = 1 << 20
MAX_FDS = 32


@dataclass(frozen=True)
class FdLoadRequest:
    source: str
    cflags: tuple[str, ...]
    state_dir: str                                                  # where the kernel stub goes
    programs: tuple[tuple[str, int, int], ...] = field(default=())  # (name, prog type, attach type)
    maps: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FdLoadRequest":
        doc = json.loads(text)
        return cls(doc["source"], tuple(doc["cflags"]), doc["state_dir"], tuple(tuple(p) for p in doc["programs"]),
                   tuple(doc["maps"]))


@dataclass
class LoadedFds:
    programs: dict[str, int]
    maps: dict[str, int]
    seconds: float       # the child's compile + load
    max_rss_kb: int      # the child's peak RSS (what the agent does not carry)

    def close(self) -> None:
        for fd in [*self.programs.values(), *self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs, self.maps = {}, {}


# ---- parent side (no bcc) --------------------------------------------------------------------------

def load_fds(request: FdLoadRequest, timeout: float = DEFAULT_TIMEOUT) -> LoadedFds:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with ours:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "agent.bpf.fdloader", request.to_json(),
                                     str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        finally:
            theirs.close()
        ours.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
        except (OSError, TimeoutError) as exc:
            proc.kill()  # our own child
            proc.wait()
            raise LoaderFailed(f"the BPF loader child gave no answer: {exc}") from exc
        _, stderr = proc.communicate(timeout=timeout)
    if not data:
        raise LoaderFailed(f"the BPF loader child exited with code {proc.returncode} without an answer: "
                           f"{_tail(stderr.decode(errors='replace'))}")
    answer = json.loads(data)
    if not answer.get("ok"):
        for fd in fds:
            os.close(fd)
        raise _error_from(answer.get("error") or {}, stderr.decode(errors="replace"))
    names = list(answer["programs"]) + list(answer["maps"])
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise LoaderFailed(f"the BPF loader child sent {len(fds)} descriptors for {len(names)} objects")
    by_name = dict(zip(names, fds))
    return LoadedFds({n: by_name[n] for n in answer["programs"]}, {n: by_name[n] for n in answer["maps"]},
                     answer["seconds"], answer["max_rss_kb"])


def _error_from(doc: dict, stderr: str) -> TcpmeshError:
    kind, message = doc.get("type"), doc.get("message", "unknown error")
    if kind == "BpfLoadError":
        return BpfLoadError(doc.get("stage", "load"), doc.get("source", ""), doc.get("program", ""), message,
                            doc.get("log", "") or stderr)
    if kind == "BccMissing":
        return BccMissing(message)
    if kind == "EnvironmentProblem":
        return EnvironmentProblem(message)
    return LoaderFailed(f"the BPF loader child failed: {message}")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"


# ---- child side (imports bcc) ----------------------------------------------------------------------

def _load(request: FdLoadRequest) -> tuple[dict, list[int]]:
    import resource
    import time

    from agent.bpf.compile import compile_source, load_program

    started = time.monotonic()
    source = Path(request.source)
    bpf = compile_source(source, request.cflags, request.state_dir)
    fds = [load_program(bpf, source, name, prog_type, attach_type).fd
           for name, prog_type, attach_type in request.programs]
    fds += [bpf[name.encode()].map_fd for name in request.maps]
    answer = {"ok": True, "programs": [p[0] for p in request.programs], "maps": list(request.maps),
              "seconds": time.monotonic() - started,
              "max_rss_kb": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}
    return answer, fds


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m agent.bpf.fdloader REQUEST_JSON SOCKET_FD (started by the agent)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[1]))
    fds: list[int] = []
    try:
        answer, fds = _load(FdLoadRequest.from_json(args[0]))
    except BpfLoadError as exc:
        answer = {"ok": False, "error": {"type": "BpfLoadError", "stage": exc.stage, "source": exc.source,
                                         "program": exc.program, "message": exc.message, "log": exc.log}}
    except (BccMissing, EnvironmentProblem) as exc:
        answer = {"ok": False, "error": {"type": type(exc).__name__ if isinstance(exc, BccMissing)
                                         else "EnvironmentProblem", "message": str(exc)}}
    except Exception as exc:  # the process root: report, never a traceback only
        answer = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
    socket.send_fds(sock, [json.dumps(answer).encode()], fds)
    sock.close()
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
