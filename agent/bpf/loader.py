"""The loader: compile bpf/capture_connect.c with bcc, load it, pin it in bpffs — in its own process.

The agent never imports bcc: libbcc maps libLLVM and clang (~75 MB resident before a compile, ~125 MB
after; docs/kernel-notes.md). ``run_loader`` (parent side, no bcc) starts
``python -m agent.bpf.loader REQUEST`` with a JSON request, waits, and turns the one JSON line it
prints into a result or the typed error the child met (BpfLoadError, BccMissing, ...). The child
(``main`` → ``load_and_pin``) holds the pin directory's lock, compiles against the kernel stub,
loads every program (the maps are created or reused at their pinned paths by bcc itself), pins
the programs into a staging directory and renames it to the set's name, so a set directory is
either complete or absent. Then it exits; the pins keep programs and maps alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from agent.bpf import kstub, pins
from agent.bpf.errors import BccMissing, BpfLoadError, LoaderFailed
from agent.errors import EnvironmentProblem, TcpmeshError

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class LoadRequest:
    source: str                 # the main C file
    cflags: tuple[str, ...]     # including -DTCPMESH_MAPS_DIR
    bpffs_dir: str
    set_name: str
    maps_name: str
    state_dir: str              # where the kernel stub tree is materialised
    programs: tuple[tuple[str, int, int], ...] = field(default=())  # (name, prog type, expected attach type)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoadRequest":
        doc = json.loads(text)
        doc["cflags"] = tuple(doc["cflags"])
        doc["programs"] = tuple(tuple(p) for p in doc["programs"])
        return cls(**doc)


@dataclass(frozen=True)
class LoadResult:
    compiled: bool           # False: another loader had pinned this set meanwhile
    compile_seconds: float
    load_seconds: float
    max_rss_kb: int          # the loader's peak RSS (what the agent no longer carries)


# ---- parent side (no bcc) --------------------------------------------------------------------------

def run_loader(request: LoadRequest, timeout: float = DEFAULT_TIMEOUT) -> LoadResult:
    """Run the loader process for ``request``; raise the error it reports."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.bpf.loader", request.to_json()],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise LoaderFailed(f"the BPF loader did not finish within {timeout:.0f}s") from exc
    answer = _last_json_line(proc.stdout)
    if answer is None:
        raise LoaderFailed(f"the BPF loader exited with code {proc.returncode} without an answer; "
                           f"its output:\n{_tail(proc.stderr or proc.stdout)}")
    if not answer.get("ok"):
        raise _error_from(answer.get("error") or {}, proc.stderr)
    return LoadResult(**answer["result"])


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                return doc
    return None


def _error_from(doc: dict[str, Any], stderr: str) -> TcpmeshError:
    kind = doc.get("type")
    message = doc.get("message", "unknown error")
    if kind == "BpfLoadError":
        return BpfLoadError(doc.get("stage", "load"), doc.get("source", ""), doc.get("program", ""), message,
                            doc.get("log", "") or stderr)
    if kind == "BccMissing":
        return BccMissing(message)
    if kind == "EnvironmentProblem":
        return EnvironmentProblem(message)
    return LoaderFailed(f"the BPF loader failed: {message}")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"


# ---- child side (imports bcc) ----------------------------------------------------------------------

def load_and_pin(request: LoadRequest) -> LoadResult:
    from agent.bpf.libbpf import Libbpf

    bpffs_dir = Path(request.bpffs_dir)
    set_dir = bpffs_dir / request.set_name
    names = [name for name, _, _ in request.programs]
    with pins.locked(str(bpffs_dir)):
        if pins.complete(set_dir, names):
            return LoadResult(False, 0.0, 0.0, _max_rss_kb())
        pins.remove_tree(set_dir)  # an incomplete set cannot come from a rename; never adopt one
        (bpffs_dir / request.maps_name).mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        bpf = _compile(request)
        compiled = time.monotonic()
        try:
            fds = _load_programs(bpf, request)
            staging = bpffs_dir / f"{pins.STAGING_PREFIX}{request.set_name}-{os.getpid()}"
            pins.remove_tree(staging)
            staging.mkdir(mode=0o700)
            libbpf = Libbpf()
            for name, fd in fds.items():
                libbpf.obj_pin(fd, str(staging / name))
            os.rename(staging, set_dir)
        finally:
            bpf.cleanup()
        return LoadResult(True, compiled - started, time.monotonic() - compiled, _max_rss_kb())


def _compile(request: LoadRequest):
    try:
        from bcc import BPF
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        raise BccMissing(f"bcc not importable ({exc}): install Debian's python3-bpfcc and link it into "
                         "the venv; run `make setup`") from exc
    source = Path(request.source)
    if not source.is_file():
        raise BpfLoadError("compile", str(source), "", "source file not found: the tcpmesh tree is incomplete")
    tree = kstub.materialise(Path(request.state_dir) / "bcc-kstub")
    with kstub.kernel_source(tree), captured_stderr() as log:
        try:
            return BPF(src_file=str(source).encode(), cflags=list(request.cflags))
        except Exception as exc:
            raise BpfLoadError("compile", str(source), "", str(exc), log.read()) from exc


def _load_programs(bpf, request: LoadRequest) -> dict[str, int]:
    fds = {}
    for name, prog_type, attach_type in request.programs:
        with captured_stderr() as log:
            try:
                fds[name] = bpf.load_func(name.encode(), prog_type, attach_type=attach_type).fd
            except Exception as exc:
                raise BpfLoadError("load", request.source, name, str(exc), log.read()) from exc
    return fds


def _max_rss_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class _Log:
    def __init__(self, file) -> None:
        self._file = file

    def read(self) -> str:
        self._file.flush()
        self._file.seek(0)
        return self._file.read().decode(errors="replace")


@contextlib.contextmanager
def captured_stderr() -> Iterator[_Log]:
    """Capture fd 2 (where libbcc prints clang errors and the verifier log) for the block.

    Whatever was captured is replayed to the real stderr afterwards, so nothing is hidden.
    """
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield _Log(tmp)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                os.write(2, data)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m agent.bpf.loader REQUEST_JSON (started by the agent)", file=sys.stderr)
        return 2
    try:
        result = load_and_pin(LoadRequest.from_json(args[0]))
    except BpfLoadError as exc:
        answer = {"ok": False, "error": {"type": "BpfLoadError", "stage": exc.stage, "source": exc.source,
                                         "program": exc.program, "message": exc.message, "log": exc.log}}
    except (BccMissing, EnvironmentProblem) as exc:
        answer = {"ok": False, "error": {"type": type(exc).__name__ if isinstance(exc, BccMissing)
                                         else "EnvironmentProblem", "message": str(exc)}}
    except Exception as exc:  # the process root: report, never a traceback only
        answer = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
    else:
        answer = {"ok": True, "result": asdict(result)}
    print(json.dumps(answer), flush=True)
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
