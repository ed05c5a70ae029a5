"""The same-node kernel splice without a kernel: bpf/splice/abi.h against its ctypes mirror (compiled
with gcc), the pin names, and proxy.same_node's choices. The kernel behaviour (ordering at the join,
half-close, resets, byte counts, the map emptied) is tested on the lab: tests/e2e/test_same_node.py."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from agent import config as C
from agent.proxy import splice
from agent.proxy import splice_abi as abi
from tests.conftest import require_binary

BPF = Path(__file__).resolve().parents[2] / "bpf"

PROBE = r"""
#include <stdio.h>
#include "splice/abi.h"
int main(void) {
    printf("consts %d %d %d %d\n", TCPMESH_SPLICE_ABI_VERSION, TCPMESH_SPLICE_SOCKETS, TCPMESH_SPR_MAX,
           TCPMESH_SPR_SLOTS);
    printf("reasons %d %d %d\n", TCPMESH_SPR_REDIRECTED, TCPMESH_SPR_NO_PEER, TCPMESH_SPR_EMPTY);
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, list[int]]:
    require_binary("gcc", "gcc")
    work = tmp_path_factory.mktemp("splice-abi")
    (work / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{BPF}", "-o", str(work / "probe"), str(work / "probe.c")],
                   check=True, capture_output=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()}


def test_the_c_header_and_the_ctypes_mirror_agree(probe):
    assert probe["consts"] == [abi.SPLICE_ABI_VERSION, abi.SPLICE_SOCKETS, abi.REASON_MAX, abi.REASON_SLOTS]
    assert probe["reasons"] == sorted(abi.REASONS) and len(abi.REASONS) == abi.REASON_MAX
    assert splice.REASON_NAMES == ("redirected", "no_peer", "empty")
    assert abi.MAPS[splice.PEERS] == (ctypes.sizeof(ctypes.c_uint64), ctypes.sizeof(ctypes.c_uint32))
    assert all(name.startswith("tcpmesh_") for name in abi.MAPS)
    assert len({name[:15] for name in abi.MAPS}) == len(abi.MAPS)  # the kernel keeps 15 characters


def test_pin_names_follow_the_sources_and_the_size(tmp_path):
    tree = tmp_path / "bpf"
    (tree / "splice").mkdir(parents=True)
    for rel in (splice.SOURCE_NAME, *splice.HEADERS):
        (tree / rel).write_text((BPF / rel).read_text())
    maps, prog = splice.pin_names(tree, 1024)
    assert maps.startswith(f"{splice.PIN_PREFIX}maps-v{abi.SPLICE_ABI_VERSION}-")
    assert prog.startswith(f"{splice.PIN_PREFIX}set-v{abi.SPLICE_ABI_VERSION}-")
    assert splice.pin_names(tree, 2048)[0] != maps  # the size is in the maps' name
    (tree / splice.SOURCE_NAME).write_text((BPF / splice.SOURCE_NAME).read_text() + "\n/* changed */\n")
    changed = splice.pin_names(tree, 1024)
    assert changed[0] == maps and changed[1] != prog  # a program change reloads the program, keeps the maps


def test_same_node_offers_splice_local_and_tunnel():
    assert C.SAME_NODE_CHOICES == ("splice", "local", "tunnel")
