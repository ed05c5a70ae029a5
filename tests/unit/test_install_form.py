"""The fix a message names fits how the agent was installed (agent.install_form): a node set up by `make install`
was told "`make setup` builds it" of its compiled data path (`tcpmesh doctor`), a command of a checkout it does
not have. Seen failing before the fix for the make-install tree: the message named `make setup`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.install_form import CHECKOUT, MAKE_INSTALL, PACKAGE, bcc_link_command, build_command, install_form

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path, *files: str) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root / "agent"


@pytest.mark.parametrize("files, form, says, never", [
    (("Makefile", "setup.py", "agent/__init__.py"), CHECKOUT, "`make setup`", "make install"),
    # systemd/install.sh's own copy, PREFIX/src: pyproject.toml, setup.py, README.md, agent/, bpf/ (no Makefile)
    (("pyproject.toml", "setup.py", "README.md", "agent/__init__.py", "bpf/x.c"), MAKE_INSTALL, "`make install`",
     "make setup"),
    (("agent/__init__.py",), PACKAGE, "pip", "make "),   # a wheel in a venv's site-packages
])
def test_the_build_command_fits_the_install(tmp_path, files, form, says, never):
    package = tree(tmp_path, *files)
    assert install_form(package) == form
    assert says in build_command(package) and never not in build_command(package)
    assert never not in bcc_link_command(package)


def test_this_checkout_is_a_checkout():
    assert install_form() == CHECKOUT and str(REPO) in build_command()


def make_install_tree(src: Path, agent_dir: Path = REPO / "agent") -> Path:
    """``src`` laid out as systemd/install.sh lays out PREFIX/src, from ``agent_dir``, with no compiled module."""
    shutil.copytree(agent_dir, src / "agent", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    return src


def test_the_data_path_of_a_make_install_node_names_make_install(tmp_path):
    """What `tcpmesh doctor` shows on a make-install node whose compiled module was not built (no gcc or
    python3-dev when it installed): the agent imported from a make-install tree."""
    src = make_install_tree(tmp_path / "opt-tcpmesh-src")
    env = {**{k: v for k, v in os.environ.items() if k != "TCPMESH_HOTPATH"}, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", "from agent.proxy import hotpath; print(hotpath.describe())"],
                          capture_output=True, text=True, env=env, cwd="/", timeout=60)
    described = done.stdout.strip()
    assert described.startswith("pure Python (agent.proxy._hotpath not built"), done.stderr
    assert f"`make install` again from a tcpmesh checkout (it rebuilds {src}" in described, described
    assert "make setup" not in described, described
