"""Loading BPF, child side: ``python -m agent.bpf.child REQUEST_JSON FD`` — the only process that imports bcc.

Started by agent.bpf.loader.load (read its docstring for the protocol). Compiles the request's source
against the kernel stub (agent.bpf.compile), loads every program, then either
  - pins them (``pin_to``): under the pin directory's flock; a set already complete is left as it is
    (``compiled`` False); otherwise the programs are pinned into a staging directory that is renamed to
    the set's name, so a set directory is either complete or absent (the maps are created or reused at
    their pinned paths by bcc itself, -DTCPMESH_MAPS_DIR);
  - or sends the program and map fds back with the answer (SCM_RIGHTS).
Then it exits. Every outcome is one answer on the socket; nothing but the answer is an interface.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from agent.bpf import pins
from agent.bpf.compile import compile_source, load_program
from agent.bpf.errors import BpfLoadError
from agent.bpf.libbpf import Libbpf
from agent.bpf.loader import LoadRequest, PinTo, error_document


def serve(request: LoadRequest) -> tuple[dict[str, Any], list[int]]:
    """The result document and the fds to send with it."""
    if request.pin_to is not None:
        return _pin(request, request.pin_to), []
    started = time.monotonic()
    source = Path(request.source)
    bpf = compile_source(source, request.cflags, request.state_dir)
    compiled = time.monotonic()
    programs, failed = _load(bpf, request)
    fds = list(programs.values()) + [bpf[name.encode()].map_fd for name in request.maps]
    return _result(True, started, compiled, list(programs), list(request.maps), failed), fds


def _pin(request: LoadRequest, pin_to: PinTo) -> dict[str, Any]:
    bpffs_dir = Path(pin_to.bpffs_dir)
    set_dir = bpffs_dir / pin_to.set_name
    names = [program.name for program in request.programs]
    with pins.locked(str(bpffs_dir)):
        if pins.complete(set_dir, names):
            now = time.monotonic()
            return _result(False, now, now, [], [], {})
        pins.remove_tree(set_dir)  # an incomplete set cannot come from a rename; never adopt one
        (bpffs_dir / pin_to.maps_name).mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        bpf = compile_source(Path(request.source), request.cflags, request.state_dir)
        compiled = time.monotonic()
        try:
            programs, failed = _load(bpf, request)
            staging = bpffs_dir / f"{pins.STAGING_PREFIX}{pin_to.set_name}-{os.getpid()}"
            pins.remove_tree(staging)
            staging.mkdir(mode=0o700)
            libbpf = Libbpf()
            for name, fd in programs.items():
                libbpf.obj_pin(fd, str(staging / name))
            os.rename(staging, set_dir)
        finally:
            bpf.cleanup()
        return _result(True, started, compiled, [], [], failed)


def _load(bpf, request: LoadRequest) -> tuple[dict[str, int], dict[str, str]]:
    """{program: fd} of the loaded programs, {program: error} of those the verifier refused (probe only)."""
    fds: dict[str, int] = {}
    failed: dict[str, str] = {}
    for program in request.programs:
        try:
            fds[program.name] = load_program(bpf, Path(request.source), *program).fd
        except BpfLoadError as exc:
            if not request.probe:
                raise
            failed[program.name] = str(exc)
    return fds, failed


def _result(compiled: bool, started: float, compiled_at: float, programs: list[str], maps: list[str],
            failed: dict[str, str]) -> dict[str, Any]:
    return {"compiled": compiled, "compile_seconds": compiled_at - started,
            "load_seconds": time.monotonic() - compiled_at, "programs": programs, "maps": maps, "failed": failed,
            "max_rss_kb": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m agent.bpf.child REQUEST_JSON SOCKET_FD (started by the agent)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[1]))
    fds: list[int] = []
    try:
        result, fds = serve(LoadRequest.from_json(args[0]))
        answer: dict[str, Any] = {"ok": True, "result": result}
    except Exception as exc:  # the process root: every error is answered, typed where the parent knows it
        answer = {"ok": False, "error": error_document(exc)}
    socket.send_fds(sock, [json.dumps(answer).encode()], fds)
    sock.close()
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
