"""The kernel-header stub tree: what materialise builds, idempotence, and clear errors."""

from __future__ import annotations

import os

import pytest

from agent.bpf import kstub
from agent.errors import EnvironmentProblem


@pytest.fixture
def usr_include(tmp_path):
    root = tmp_path / "usr-include"
    for sub in ("linux", "asm-generic", "x86_64-linux-gnu/asm", "aarch64-linux-gnu/asm"):
        (root / sub).mkdir(parents=True)
    return root


@pytest.mark.parametrize("machine, arch, triplet", [("x86_64", "x86", "x86_64-linux-gnu"),
                                                     ("aarch64", "arm64", "aarch64-linux-gnu")])
def test_tree_layout(tmp_path, usr_include, machine, arch, triplet):
    tree = kstub.materialise(tmp_path / "k", machine=machine, usr_include=usr_include)
    for rel in ("include/linux/kconfig.h", "include/linux/types.h", "include/linux/log2.h",
                f"arch/{arch}/include/asm/page.h"):
        assert (tree / rel).is_file(), rel
    assert os.readlink(tree / "include/uapi/linux") == str(usr_include / "linux")
    assert os.readlink(tree / "include/uapi/asm-generic") == str(usr_include / "asm-generic")
    assert os.readlink(tree / f"arch/{arch}/include/uapi/asm") == str(usr_include / triplet / "asm")
    assert "__LINUX_BPF_H__" in (tree / "include/linux/kconfig.h").read_text()


def test_idempotent_and_repairs(tmp_path, usr_include):
    tree = kstub.materialise(tmp_path / "k", machine="x86_64", usr_include=usr_include)
    (tree / "include/linux/types.h").write_text("garbage")
    (tree / "include/uapi/linux").unlink()
    (tree / "include/uapi/linux").symlink_to("/nonexistent")
    kstub.materialise(tmp_path / "k", machine="x86_64", usr_include=usr_include)
    assert "typedef __u32 u32" in (tree / "include/linux/types.h").read_text()
    assert os.readlink(tree / "include/uapi/linux") == str(usr_include / "linux")


def test_unknown_arch(tmp_path, usr_include):
    with pytest.raises(EnvironmentProblem, match="riscv64"):
        kstub.materialise(tmp_path / "k", machine="riscv64", usr_include=usr_include)


def test_missing_uapi_headers_say_what_to_install(tmp_path):
    with pytest.raises(EnvironmentProblem, match="linux-libc-dev"):
        kstub.materialise(tmp_path / "k", machine="x86_64", usr_include=tmp_path / "empty")


def test_kernel_source_is_scoped(monkeypatch):
    monkeypatch.delenv(kstub.ENV_VAR, raising=False)
    with kstub.kernel_source("/x"):
        assert os.environ[kstub.ENV_VAR] == "/x"
    assert kstub.ENV_VAR not in os.environ
    monkeypatch.setenv(kstub.ENV_VAR, "/old")
    with pytest.raises(RuntimeError):
        with kstub.kernel_source("/x"):
            raise RuntimeError
    assert os.environ[kstub.ENV_VAR] == "/old"
