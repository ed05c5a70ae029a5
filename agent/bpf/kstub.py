"""The kernel-header stub tree bcc compiles against, so no kernel-headers package is needed.

bcc 0.26 wants ``$BCC_KERNEL_SOURCE/include/linux/kconfig.h`` and a kbuild-like layout. The four
files shipped in bpf/kstub/ plus three symlinks into linux-libc-dev's UAPI headers are enough for
every UAPI-only program type tcpmesh uses (docs/kernel-notes.md, "Kernel headers").

``materialise`` (re)builds the tree in a directory, idempotently; ``kernel_source`` sets
BCC_KERNEL_SOURCE only around a compile. Touches only the directory it is given.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agent.bpf import sources
from agent.errors import EnvironmentProblem

ENV_VAR = "BCC_KERNEL_SOURCE"
SHIPPED_FILES = (  # shipped path under bpf/kstub -> path in the materialised tree ("{arch}" filled in)
    ("include/linux/kconfig.h", "include/linux/kconfig.h"),
    ("include/linux/types.h", "include/linux/types.h"),
    ("include/linux/log2.h", "include/linux/log2.h"),
    ("asm/page.h", "arch/{arch}/include/asm/page.h"),
)


@dataclass(frozen=True)
class Arch:
    kernel: str         # bcc's name for arch/<name>/ (what -D__TARGET_ARCH_<name> says)
    triplet: str        # Debian multiarch directory holding this arch's UAPI asm/


ARCHES = {
    "x86_64": Arch("x86", "x86_64-linux-gnu"),
    "aarch64": Arch("arm64", "aarch64-linux-gnu"),
    "arm64": Arch("arm64", "aarch64-linux-gnu"),
}


def shipped_dir() -> Path:
    """bpf/kstub, as shipped with this package (agent/bpf/sources.py)."""
    return sources.bpf_dir() / "kstub"


def materialise(dest: str | Path, machine: str | None = None, usr_include: str | Path = "/usr/include",
                source: str | Path | None = None) -> Path:
    """Build (or refresh) the stub tree in ``dest`` and return the path for BCC_KERNEL_SOURCE."""
    machine = machine or platform.machine()
    arch = ARCHES.get(machine)
    if arch is None:
        raise EnvironmentProblem(f"no kernel-header stub for architecture {machine!r}: "
                                 f"supported are {', '.join(sorted(ARCHES))}")
    source = Path(source) if source else shipped_dir()
    usr_include = Path(usr_include)
    links = {
        "include/uapi/linux": usr_include / "linux",
        "include/uapi/asm-generic": usr_include / "asm-generic",
        f"arch/{arch.kernel}/include/uapi/asm": usr_include / arch.triplet / "asm",
    }
    for target in links.values():
        if not (target / ".").is_dir():
            raise EnvironmentProblem(f"UAPI headers missing: {target} is not a directory; "
                                     "install them with `apt-get install linux-libc-dev` (make setup does)")
    dest = Path(dest)
    for shipped, placed in SHIPPED_FILES:
        src = source / shipped
        if not src.is_file():
            raise EnvironmentProblem(f"kernel-header stub file {src} is missing: the tcpmesh source tree is incomplete")
        _write_if_changed(dest / placed.format(arch=arch.kernel), src.read_bytes())
    for placed, target in links.items():
        _symlink(dest / placed, target)
    return dest


@contextlib.contextmanager
def kernel_source(path: str | Path) -> Iterator[None]:
    """Point bcc at ``path`` for the duration of the block, then restore the environment."""
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def _write_if_changed(path: Path, content: bytes) -> None:
    if path.is_file() and not path.is_symlink() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _symlink(path: Path, target: Path) -> None:
    if path.is_symlink() and os.readlink(path) == str(target):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target, target_is_directory=True)
