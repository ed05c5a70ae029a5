"""capture.cgroup_root: by default the host's cgroup v2 mount, found as `tcpmesh doctor` finds it.

A new user on a stock Debian 12 node (cgroup v2 only, mounted at /sys/fs/cgroup) who leaves cgroup_root out
of the config used to get /sys/fs/cgroup/unified (the hybrid hosts' place): `capture.mode: auto` then judged
ebpf-connect unusable ("missing cgroup2") and the agent quietly ran in ebpf-tc, with an info line. And the
shipped systemd/config.yaml, which names /sys/fs/cgroup, did the same on a hybrid host.
"""

from __future__ import annotations

import pytest
import yaml

from agent.config import (CGROUP_ROOT_AUTO, Config, config_from_mapping, load_agent_config, load_config,
                          resolve_cgroup_root, validate)
from agent.errors import ConfigError
from agent.host.checks import cgroup2_problem
from agent.mounts import Cgroup2, cgroup2_of

VALID = {"node": {"name": "node1", "address": "10.76.0.1"}, "capture": {"redirect_address": "169.254.1.1"},
         "identity": {"issuer": {"addresses": ["10.76.0.5:15012"]}}}
DEBIAN12 = ("sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
            "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n")
HYBRID = ("tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
          "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
          "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n")
V1_ONLY = ("tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
           "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n")
NOTHING = "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"   # a minimal or container root: no cgroup mounted


def _files(tmp_path, doc: dict, mounts: str) -> tuple[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    mounts_file = tmp_path / "mounts"
    mounts_file.write_text(mounts)
    return str(config), str(mounts_file)


def test_the_default_is_auto():
    assert Config().capture.cgroup_root == CGROUP_ROOT_AUTO == "auto"


@pytest.mark.parametrize("mounts, expected", [
    (DEBIAN12, "/sys/fs/cgroup"),            # systemd's unified hierarchy: Debian 11+, Ubuntu 21.10+, RHEL 9
    (HYBRID, "/sys/fs/cgroup/unified"),      # systemd's hybrid hierarchy (this machine)
    (V1_ONLY, "/sys/fs/cgroup/unified"),     # none mounted, v1 hierarchies: where doctor's fix mounts it (hybrid)
    (NOTHING, "/sys/fs/cgroup"),             # none mounted, nothing there: where doctor's fix mounts it (unified)
])
def test_a_config_without_cgroup_root_gets_the_hosts_cgroup2_mount(tmp_path, mounts, expected):
    path, mounts_file = _files(tmp_path, VALID, mounts)
    assert load_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root == expected


def test_auto_written_out_is_the_same_as_leaving_it_out(tmp_path):
    path, mounts_file = _files(tmp_path, {**VALID, "capture": {**VALID["capture"], "cgroup_root": "auto"}}, DEBIAN12)
    assert load_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root == "/sys/fs/cgroup"


def test_an_explicit_cgroup_root_wins_for_other_commands(tmp_path):
    """`tcpmesh doctor --config` and `tcpmesh cleanup` read the value as written (doctor then shows the mismatch)."""
    doc = {**VALID, "capture": {**VALID["capture"], "cgroup_root": "/sys/fs/cgroup/unified"}}
    path, mounts_file = _files(tmp_path, doc, DEBIAN12)
    assert load_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root == "/sys/fs/cgroup/unified"


def test_pods_cgroup_is_checked_against_the_resolved_root():
    """auto resolved to /sys/fs/cgroup: a pods_cgroup below it passes, one below /sys/fs/cgroup/unified does not."""
    ok = {**VALID, "capture": {**VALID["capture"], "pods_cgroup": "/sys/fs/cgroup/kubepods.slice"}}
    assert validate(resolve_cgroup_root(config_from_mapping(ok), cgroup2_of(DEBIAN12))).capture.pods_cgroup
    wrong = {**VALID, "capture": {**VALID["capture"], "pods_cgroup": "/sys/fs/cgroup/unified/kubepods.slice"}}
    with pytest.raises(ConfigError) as info:
        validate(resolve_cgroup_root(config_from_mapping(wrong), Cgroup2("/sys/fs/cgroup/unified/x", "/sys/fs/cgroup/unified/x")))
    assert info.value.field == "capture.pods_cgroup" and "capture.cgroup_root" in str(info.value)


@pytest.mark.parametrize("value", ["sys/fs/cgroup", ""])
def test_a_cgroup_root_that_is_neither_auto_nor_a_path_is_refused(value):
    doc = {**VALID, "capture": {**VALID["capture"], "cgroup_root": value}}
    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping(doc))
    assert info.value.field == "capture.cgroup_root" and "auto" in info.value.fix


def test_the_agent_refuses_an_explicit_cgroup_root_that_is_not_the_hosts_mount(tmp_path):
    """Seen failing before the fix: a Debian 12 node with cgroup_root /sys/fs/cgroup/unified (the old default)
    started, and capture.mode auto chose ebpf-tc without a word on why ebpf-connect was out."""
    doc = {**VALID, "capture": {**VALID["capture"], "cgroup_root": "/sys/fs/cgroup/unified"}}
    path, mounts_file = _files(tmp_path, doc, DEBIAN12)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path, environ={}, mounts_file=mounts_file)
    message = str(info.value)
    assert message.startswith(f"{path}: capture.cgroup_root"), message
    assert "/sys/fs/cgroup/unified" in message and "set capture.cgroup_root to /sys/fs/cgroup" in message, message
    assert "auto" in message, message


def test_the_agent_starts_from_a_config_with_the_hosts_mount_or_none(tmp_path):
    for cgroup_root, mounts in ((None, DEBIAN12), ("/sys/fs/cgroup", DEBIAN12), (None, HYBRID),
                                ("/sys/fs/cgroup/unified", HYBRID)):
        capture = {**VALID["capture"], **({"cgroup_root": cgroup_root} if cgroup_root else {})}
        path, mounts_file = _files(tmp_path, {**VALID, "capture": capture}, mounts)
        assert load_agent_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root.startswith("/")


def test_capture_mode_none_keeps_any_cgroup_root(tmp_path):
    """Laptop runs and in-process tests point cgroup_root at a directory of their own; nothing is captured."""
    doc = {**VALID, "capture": {"mode": "none", "cgroup_root": str(tmp_path / "cgroup")}}
    path, mounts_file = _files(tmp_path, doc, DEBIAN12)
    assert load_agent_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root == str(tmp_path / "cgroup")


def test_the_default_config_on_this_host_gets_the_mount_doctor_finds(tmp_path):
    from agent.host.checks import find_cgroup2_mount

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_config(path, environ={}).capture.cgroup_root == find_cgroup2_mount()


@pytest.mark.parametrize("mounts, fix, place", [
    # a unified host with nothing at /sys/fs/cgroup (a minimal root, a container): mount it there
    (NOTHING, "mount -t cgroup2 none /sys/fs/cgroup", "/sys/fs/cgroup"),
    # cgroup v1 hierarchies in systemd's read-only tmpfs: the kernel command line, or the hybrid layout's place
    (V1_ONLY, "systemd.unified_cgroup_hierarchy=1", "/sys/fs/cgroup/unified"),
    (V1_ONLY, "mount -o remount,rw /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/unified && "
              "mount -t cgroup2 none /sys/fs/cgroup/unified", "/sys/fs/cgroup/unified"),
])
def test_doctors_fix_for_an_unmounted_cgroup2_fits_the_host_and_auto_agrees(tmp_path, mounts, fix, place):
    """Seen failing before the fix: every host was told `mount -t cgroup2 none /sys/fs/cgroup/unified`, and a
    config with cgroup_root auto then pointed there — on a unified host, a path systemd never uses."""
    problem = cgroup2_problem(None, cgroup2_of(mounts))
    assert problem.startswith("cgroup v2 is not mounted: ") and fix in problem, problem
    path, mounts_file = _files(tmp_path, VALID, mounts)
    assert load_config(path, environ={}, mounts_file=mounts_file).capture.cgroup_root == place
    if mounts == NOTHING:
        assert "unified" not in problem, problem
