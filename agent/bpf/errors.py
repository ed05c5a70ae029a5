"""Errors of loading and driving BPF, written for the operator: what failed, on which object, and the fix.

Must not import anything of agent/ but agent.errors."""

from __future__ import annotations

from agent.errors import EnvironmentProblem, KernelError, TcpmeshError


class BpfLoadError(TcpmeshError):
    """Compiling the BPF C or loading one program into the kernel failed.

    ``stage`` is "compile" or "load"; ``program`` the function name (empty for a compile error);
    ``log`` what clang or the verifier printed (bcc writes it to stderr; the loader captures it).
    """

    def __init__(self, stage: str, source: str, program: str, message: str, log: str = "") -> None:
        self.stage = stage
        self.source = source
        self.program = program
        self.message = message
        self.log = log
        what = f"program {program} from {source}" if program else source
        text = f"BPF {stage} of {what} failed: {message}"
        tail = _tail(log)
        if tail:
            text += f"\n--- {'verifier' if stage == 'load' else 'compiler'} output (last lines) ---\n{tail}"
        super().__init__(text)


class AttachError(KernelError):
    """Attaching or detaching a program on a cgroup failed (the errno is kept)."""


class BccMissing(EnvironmentProblem):
    """bcc cannot be imported (by the loader process: the agent itself never imports it)."""


class NotLoaded(TcpmeshError):
    """A method that needs the programs was called before they were loaded (or after close())."""


class MapLayoutMismatch(TcpmeshError):
    """A map does not have the key/value sizes of the owner's ABI mirror (bpf/ and agent/ of other versions)."""


class LoaderFailed(TcpmeshError):
    """The loader process (python -m agent.bpf.loader) died or answered nonsense."""


def _tail(log: str, lines: int = 25) -> str:
    rows = [row for row in log.strip().splitlines() if row.strip()]
    return "\n".join(rows[-lines:])
