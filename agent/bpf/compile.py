"""The bcc calls of the loader child (agent.bpf.child): compile one bpf/*.c file against the kernel-header
stub, load one named program of it.

bcc is imported inside ``compile_source`` only, and only the child calls it: the agent never maps
libbcc. What clang or the verifier printed (libbcc writes it to fd 2) is captured around the compile
and each load, attached to the BpfLoadError, and replayed to stderr.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from agent.bpf import kstub
from agent.bpf.errors import BccMissing, BpfLoadError


def import_bcc():
    try:
        import bcc
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        raise BccMissing(f"bcc not importable ({exc}): install Debian's python3-bpfcc and link it into "
                         "the venv; run `make setup`") from exc
    return bcc


def compile_source(source: Path, cflags: Sequence[str], state_dir: str | os.PathLike):
    """A bcc BPF object for ``source`` (compiled, nothing loaded yet). The caller calls cleanup()."""
    bcc = import_bcc()
    if not source.is_file():
        raise BpfLoadError("compile", str(source), "", "source file not found: the tcpmesh tree is incomplete")
    tree = kstub.materialise(Path(state_dir) / "bcc-kstub")
    with kstub.kernel_source(tree), captured_stderr() as log:
        try:
            return bcc.BPF(src_file=str(source).encode(), cflags=list(cflags))
        except Exception as exc:
            raise BpfLoadError("compile", str(source), "", str(exc), log.read()) from exc


def load_program(bpf, source: Path, name: str, prog_type: int, attach_type: int = -1):
    """Load one function of a compiled object; BpfLoadError with the verifier's last lines."""
    with captured_stderr() as log:
        try:
            return bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
        except Exception as exc:
            raise BpfLoadError("load", str(source), name, str(exc), log.read()) from exc


class _Log:
    def __init__(self, file) -> None:
        self._file = file

    def read(self) -> str:
        self._file.flush()
        self._file.seek(0)
        return self._file.read().decode(errors="replace")


@contextlib.contextmanager
def captured_stderr(replay: bool = True) -> Iterator[_Log]:
    """Capture fd 2 for the block (process-wide: only around compile/load, before serving traffic)."""
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
            if data and replay:
                os.write(2, data)
