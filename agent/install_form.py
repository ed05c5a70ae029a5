"""How this agent was installed — told by the tree its ``agent`` package sits in — and so the command that builds
again what the install builds (the compiled data path, bcc linked into the venv), for the messages that name a
fix: agent.proxy.hotpath (what `tcpmesh doctor` shows of the data path), agent.host.checks and probes (bcc).

- a checkout set up by ``make setup`` (deploy/bootstrap-debian.sh): the tree holds the Makefile;
- ``make install`` (systemd/install.sh): its own copy under PREFIX/src (pyproject.toml, setup.py, agent/, bpf/;
  no Makefile), installed editable into the venv PREFIX;
- a package (a wheel, or pip from an sdist): the package in a venv's site-packages, no setup.py beside it.

A few stats when asked; imports nothing of agent/.
"""

from __future__ import annotations

from pathlib import Path

CHECKOUT = "checkout"
MAKE_INSTALL = "make install"
PACKAGE = "package"
DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc"  # python3-bpfcc's package (bcc is not on PyPI)


def install_form(package_dir: Path | None = None) -> str:
    """CHECKOUT, MAKE_INSTALL or PACKAGE for the ``agent`` package at ``package_dir`` (default: this one)."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    if (root / "setup.py").is_file():
        return CHECKOUT if (root / "Makefile").is_file() else MAKE_INSTALL
    return PACKAGE


def build_command(package_dir: Path | None = None) -> str:
    """The command, as said to an operator, that builds this install's compiled data path again."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    return {CHECKOUT: f"`make setup` (in {root})",
            MAKE_INSTALL: f"`make install` again from a tcpmesh checkout (it rebuilds {root}; then restart the agent)",
            PACKAGE: "installing tcpmesh again with pip (it builds the module from the source distribution)",
            }[install_form(package_dir)]


def bcc_link_command(package_dir: Path | None = None) -> str:
    """The command, as said to an operator, that links Debian's bcc into this install's venv."""
    form = install_form(package_dir)
    if form == CHECKOUT:
        return "`make setup` does both"
    if form == MAKE_INSTALL:
        return "`make install` from a tcpmesh checkout does both"
    return f"link it with `ln -s {DEBIAN_BCC} <the venv's site-packages>/bcc`"
