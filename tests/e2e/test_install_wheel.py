"""`pip install .` as a wheel: the installed agent carries bpf/ and needs no checkout.

A wheel is built from a copy of this checkout as `pip install .` builds it (an isolated build
environment: setuptools from the configured package index) and installed into a fresh venv (bcc
linked in as deploy/bootstrap-debian.sh does; tcpmesh's PyPI dependencies are borrowed from the test
venv, but tcpmesh itself comes only from the wheel). Then, from a directory outside the checkout and
with no PYTHONPATH:
- the wheel holds every file of bpf/ (C programs, headers, the kernel-header stub);
- the installed package finds them inside itself, not in the checkout;
- `tcpmesh doctor --json` compiles bpf/probe.c with the shipped stub and loads the probe programs;
- the installed package compiles capture_connect.c (the ebpf-connect programs) from its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BPF_IN_WHEEL = "agent/bpf_sources/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the checkout (what `pip install .` builds), so no build/ lands in the repo."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("agent", "bpf"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300, cwd=str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    wheels = list(out.glob("tcpmesh-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel's tcpmesh; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "bcc").symlink_to("/usr/lib/python3/dist-packages/bcc")
    # The dependencies (click, cryptography, ...) from the test venv's site-packages, listed after the
    # fresh venv's own: its .pth files (the editable tcpmesh among them) are not processed from there.
    (site / "zz-test-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    return root / "bin"


def outside_checkout(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd), env=env)


def test_wheel_holds_bpf_sources_headers_and_kstub(wheel):
    shipped = {str(p.relative_to(REPO / "bpf")) for p in (REPO / "bpf").rglob("*")
               if p.is_file() and p.suffix in (".c", ".h")}
    assert {"capture_connect.c", "probe.c", "include/tcpmesh_abi.h", "kstub/include/linux/types.h"} <= shipped
    with zipfile.ZipFile(wheel) as zf:
        carried = {n[len(BPF_IN_WHEEL):] for n in zf.namelist() if n.startswith(BPF_IN_WHEEL)}
    assert shipped - carried == set(), f"bpf/ files missing from the wheel: {sorted(shipped - carried)}"


def test_installed_package_finds_its_bpf_sources_inside_itself(installed, tmp_path):
    probe = ("import agent, agent.bpf.sources as b, agent.bpf.kstub as k; "
             "print(agent.__file__); print(b.bpf_dir()); print(k.shipped_dir())")
    out = outside_checkout([str(installed / "python"), "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    agent_file, bpf_dir, kstub_dir = out.stdout.split()
    package = Path(agent_file).parent
    assert not agent_file.startswith(str(REPO)), f"agent imported from the checkout: {agent_file}"
    assert Path(bpf_dir) == package / "bpf_sources" and (Path(bpf_dir) / "capture_connect.c").is_file()
    assert Path(kstub_dir) == package / "bpf_sources" / "kstub"


def test_installed_tcpmesh_doctor_compiles_and_loads_the_probe_programs(installed, tmp_path, bpf_capable):
    done = outside_checkout([str(installed / "tcpmesh"), "doctor", "--json", "--mode", "ebpf-connect",
                             "--state-dir", str(tmp_path / "state")], tmp_path, timeout=180)
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bpf_compile"]["result"] == "ok", checks["bpf_compile"]
    loaded = [name for name, c in checks.items() if name.startswith("prog_") and c["result"] == "ok"]
    assert "prog_connect4" in loaded and "prog_sockops" in loaded, checks
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_package_compiles_the_capture_programs_from_its_own_sources(installed, tmp_path, bpf_capable):
    """capture_connect.c (the programs `ebpf-connect` pins) compiles from the wheel's copy, headers and stub
    included; nothing is loaded or attached."""
    script = ("import sys; from agent.bpf.compile import compile_source; "
              "from agent.capture.connect_mode import bpf_dir, compile_flags; "
              "src = bpf_dir() / 'capture_connect.c'; "
              "b = compile_source(src, compile_flags(bpf_dir(), '10.200.1.1', 15001), sys.argv[1]); "
              "print(src); b.cleanup()")
    out = outside_checkout([str(installed / "python"), "-c", script, str(tmp_path / "state")], tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "site-packages/agent/bpf_sources/capture_connect.c" in out.stdout, out.stdout
