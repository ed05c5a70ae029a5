"""bpf/include/tcpmesh_abi.h vs agent/capture/abi.py, checked two ways:

1. gcc compiles a program that includes the header and prints sizeof/offsetof of every field of
   every mirrored struct and the value of every mirrored constant; each must equal the mirror.
2. bcc's generated Key/Leaf ctypes of the loaded maps (what bcc derived from the same header as
   compiled for BPF) must have the mirror's size and field offsets.
Both directions matter: a field added on one side changes sizeof and fails here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.capture import abi

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "bpf" / "include"


def c_layout_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "tcpmesh_abi.h"', "int main(void) {"]
    for c_name, mirror in abi.STRUCTS.items():
        lines.append(f'  printf("sizeof {c_name} %zu\\n", sizeof(struct {c_name}));')
        lines.append(f'  printf("alignof {c_name} %zu\\n", _Alignof(struct {c_name}));')
        for field, *_ in mirror._fields_:
            lines.append(f'  printf("offsetof {c_name}.{field} %zu\\n", offsetof(struct {c_name}, {field}));')
            lines.append(f'  printf("sizeof {c_name}.{field} %zu\\n", sizeof(((struct {c_name} *)0)->{field}));')
    for name in abi.C_CONSTANTS:
        lines.append(f'  printf("const {name} %lld\\n", (long long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def mirror_layout() -> dict[str, int]:
    expected: dict[str, int] = {}
    for c_name, mirror in abi.STRUCTS.items():
        expected[f"sizeof {c_name}"] = ctypes.sizeof(mirror)
        expected[f"alignof {c_name}"] = ctypes.alignment(mirror)
        for field, ftype in mirror._fields_:
            expected[f"offsetof {c_name}.{field}"] = getattr(mirror, field).offset
            expected[f"sizeof {c_name}.{field}"] = ctypes.sizeof(ftype)
    for name, value in abi.C_CONSTANTS.items():
        expected[f"const {name}"] = value
    return expected


def test_header_matches_ctypes_mirror(tmp_path):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("no C compiler: install gcc (make setup does)")
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text(c_layout_program())
    build = subprocess.run([gcc, "-std=c11", "-Wall", "-Werror", f"-I{HEADER_DIR}", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    actual = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}
    assert actual == mirror_layout()


def test_header_has_no_unmirrored_reason_codes():
    text = (HEADER_DIR / "tcpmesh_abi.h").read_text()
    in_c = {word.split("=")[0].strip() for word in text.split() if word.startswith("TCPMESH_R_")}
    assert in_c == {n for n in abi.C_CONSTANTS if n.startswith("TCPMESH_R_")}


def _named_fields(ctype) -> dict[str, tuple[int, int]]:
    if not hasattr(ctype, "_fields_"):
        return {}
    return {name: (getattr(ctype, name).offset, ctypes.sizeof(ftype))
            for name, ftype, *_ in ctype._fields_ if not name.startswith("__pad")}


@pytest.fixture(scope="module")
def bcc_module(bpf_capable, tmp_path_factory):
    """capture_connect.c compiled in this (test) process with unpinned maps, for bcc's own types.
    (The agent never does this: its loader process compiles and pins.)"""
    from bcc import BPF

    from agent.bpf import kstub
    from agent.capture.connect_mode import bpf_dir, compile_flags

    tree = kstub.materialise(tmp_path_factory.mktemp("kstub"))
    with kstub.kernel_source(tree):
        bpf = BPF(src_file=str(bpf_dir() / "capture_connect.c").encode(),
                  cflags=compile_flags(bpf_dir(), "10.200.1.1", 15001))
    try:
        yield bpf
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("map_name", sorted(set(abi.MAPS) - abi.SOCKET_STORAGE_MAPS))
def test_bcc_map_types_match_ctypes_mirror(bcc_module, map_name):
    """(Socket storage has no bcc table class: its value is checked by the gcc layout test, and its
    sizes in the kernel by test_pinned_maps_have_the_mirror_layout.)"""
    table = bcc_module[map_name.encode()]
    key_mirror, leaf_mirror = abi.MAPS[map_name]
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's slot
    for generated, mirror in ((table.Key, key_mirror), (leaf, leaf_mirror)):
        assert ctypes.sizeof(generated) == ctypes.sizeof(mirror), (map_name, generated, mirror)
        assert _named_fields(generated) == _named_fields(mirror), (map_name, generated, mirror)


def test_pinned_maps_have_the_mirror_layout(capture):
    """What the agent opens (bpf_obj_get, no bcc): key/value sizes and entries of every pinned map."""
    pinned = capture.pinned()
    for name, (key, value) in abi.MAPS.items():
        info = pinned.libbpf.map_info(pinned.map_fd(name), name)
        assert (info.key_size, info.value_size) == (ctypes.sizeof(key), ctypes.sizeof(value)), name
        assert name.startswith(info.name)  # the kernel keeps 15 characters
    assert pinned.libbpf.map_info(pinned.map_fd("tcpmesh_counters"), "").max_entries == abi.REASON_SLOTS
