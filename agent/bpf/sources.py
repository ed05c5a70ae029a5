"""Where the shipped BPF C sources live: the programs, their headers and the kernel-header stub.

``agent/bpf_sources`` is the repository's ``bpf/``: a symlink in a checkout (and so in an editable
install), a real directory in an installed wheel (pyproject.toml's package-data copies it in). Every
reader of a .c or .h file asks ``bpf_dir()``, so a checkout and a wheel installed without one find the
same files the same way. Imports nothing of tcpmesh.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE_DIR = "bpf_sources"


def bpf_dir() -> Path:
    """The directory holding bpf/*.c, include/, lib/, tcpstats/ and kstub/ (symlinks resolved)."""
    return Path(str(resources.files("agent") / PACKAGE_DIR)).resolve()


def package_root() -> str:
    """The directory the ``agent`` package is imported from (a checkout, or site-packages): a child
    process started with ``python -m agent....`` puts it on its path to import this same agent."""
    return str(Path(str(resources.files("agent"))).resolve().parent)


def base_cflags(source_dir: Path) -> list[str]:
    """The include paths every program of ``source_dir`` compiles with (its lib/ and include/ headers)."""
    return [f"-I{source_dir}", f"-I{source_dir / 'include'}"]
