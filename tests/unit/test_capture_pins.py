"""Pin names, bpffs detection and the capture config paths: pure parts, no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bpf import pins
from agent.capture.connect_mode import (HOOKS, MAP_SOURCES, PROGRAMS, ROLE_GUARD, compile_flags, hooks_for,
                                        program_flags)
from agent.config import config_from_mapping, validate
from agent.errors import ConfigError

MOUNTS = """\
sysfs /sys sysfs rw 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
"""


def tree(tmp_path: Path) -> Path:
    src = tmp_path / "bpf"
    for rel, text in (("capture_connect.c", "int x;"), ("other.c", "int y;"), ("lib/maps.h", "maps"),
                      ("lib/origin.h", "origin"), ("include/tcpmesh_abi.h", "abi")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    return src


def names(src: Path, conns: int = 65536, port: int = 15001) -> pins.SetNames:
    return pins.set_names(src, "capture_connect.c", 2, conns, program_flags("10.0.0.1", port, conns), PROGRAMS,
                          map_sources=MAP_SOURCES)


def test_names_are_stable_and_carry_the_abi_version(tmp_path):
    src = tree(tmp_path)
    first = names(src)
    assert first == names(src)
    assert first.maps.startswith("maps-v2-") and first.set.startswith("set-v2-")
    assert "." not in first.maps + first.set  # bpffs refuses dots in names


def test_program_change_keeps_the_maps_and_map_change_renames_both(tmp_path):
    src = tree(tmp_path)
    before = names(src)
    (src / "lib/origin.h").write_text("origin v2")
    code = names(src)
    assert code.maps == before.maps and code.set != before.set
    assert names(src, port=15002).maps == code.maps  # a flag changes the programs only
    (src / "lib/maps.h").write_text("maps v2")
    layout = names(src)
    assert layout.maps != code.maps and layout.set != code.set
    assert names(src, conns=1024).maps != layout.maps  # map size is part of the definition


def test_another_c_file_does_not_change_the_set(tmp_path):
    src = tree(tmp_path)
    before = names(src)
    (src / "other.c").write_text("int z;")  # capture_tc.c and friends are not compiled with it
    assert names(src) == before


def test_bpffs_mount_detection():
    assert pins.bpffs_mount_of("/sys/fs/bpf/tcpmesh/node1", MOUNTS) == "/sys/fs/bpf"
    assert pins.bpffs_mount_of("/sys/fs/bpfx/a", MOUNTS) is None
    assert pins.bpffs_mount_of("/run/tcpmesh", MOUNTS) is None


def test_ensure_bpffs_refuses_a_directory_off_bpffs(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    with pytest.raises(Exception, match="not on a bpf filesystem"):
        pins.ensure_bpffs(str(tmp_path / "pins"), str(mounts))


def test_remove_tree_dry_run_and_twice(tmp_path):
    root = tmp_path / "pins"
    (root / "set-v2-x").mkdir(parents=True)
    (root / "set-v2-x" / "tcpmesh_conn4").write_text("")
    listed = pins.remove_tree(root, dry_run=True)
    assert listed == [f"{root}/set-v2-x/tcpmesh_conn4", f"{root}/set-v2-x/", f"{root}/"] and root.exists()
    assert pins.remove_tree(root) == listed and not root.exists()
    assert pins.remove_tree(root) == []


def test_compile_flags_name_the_maps_dir_and_guard_hooks_exist(tmp_path):
    flags = compile_flags(tmp_path, "10.0.0.1", 15001, 4096, "/sys/fs/bpf/x/maps-v2-ab")
    assert '-DTCPMESH_MAPS_DIR="/sys/fs/bpf/x/maps-v2-ab"' in flags and "-DTCPMESH_MAX_CONNS=4096" in flags
    assert [h.program for h in hooks_for(ROLE_GUARD)] == ["tcpmesh_guard6", "tcpmesh_guard4"]
    assert len(PROGRAMS) == len(set(PROGRAMS)) == len(HOOKS) == 11


BASE = {"node": {"name": "n1", "address": "10.0.0.1"}, "capture": {"redirect_address": "10.0.0.1"},
        "identity": {"issuer": {"addresses": ["10.0.0.5:15012"]}}}


@pytest.mark.parametrize("capture, field", [
    ({"pods_cgroup": "/sys/fs/cgroup/unified"}, "capture.pods_cgroup"),
    ({"pods_cgroup": "/elsewhere/pods"}, "capture.pods_cgroup"),
    ({"pods_cgroup": "relative/pods"}, "capture.pods_cgroup"),
    ({"cgroup_scope": "/tmp"}, "capture.cgroup_scope"),
    ({"bpffs_dir": "tcpmesh"}, "capture.bpffs_dir"),
])
def test_capture_paths_are_validated(capture, field):
    doc = {**BASE, "capture": {**BASE["capture"], "cgroup_root": "/sys/fs/cgroup/unified", **capture}}
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping(doc))
    assert info.value.field == field


def test_capture_paths_accept_a_pods_cgroup_below_the_root():
    doc = {**BASE, "capture": {**BASE["capture"], "cgroup_root": "/sys/fs/cgroup/unified",
                               "pods_cgroup": "/sys/fs/cgroup/unified/kubepods.slice",
                               "cgroup_scope": "/sys/fs/cgroup/unified", "bpffs_dir": "/sys/fs/bpf/tcpmesh/n1"}}
    config = validate(config_from_mapping(doc))
    assert config.capture.pods_cgroup.endswith("kubepods.slice")


def test_agent_below_the_pods_cgroup_is_refused(tmp_path):
    from agent.capture.modes import _check_pods_cgroup

    pods = tmp_path / "pods"
    (pods / "agent").mkdir(parents=True)
    with pytest.raises(ConfigError, match="contains the agent's cgroup"):
        _check_pods_cgroup(str(pods), str(pods / "agent"))
    with pytest.raises(ConfigError, match="does not exist"):
        _check_pods_cgroup(str(tmp_path / "missing"), str(tmp_path))
    _check_pods_cgroup(str(pods), str(tmp_path / "agent"))
    _check_pods_cgroup("", str(pods / "agent"))  # no guard configured: nothing to check
    # the DaemonSet: the agent below kubepods, its network namespace exempt from the guard
    _check_pods_cgroup(str(pods), str(pods / "agent"), exempt_host_network=True)
