"""ConnectCapture's pure parts: cflags, validation, hook table, cgroup targets, error text."""

from __future__ import annotations

import pytest

from agent.capture import ConnectCapture, NotLoaded
from agent.capture.cgroups import cgroup_target
from agent.capture.connect_mode import (HOOKS, ROLE_POD, ROLE_PROXY, compile_flags, connect_sets_cb_flags, hooks_for,
                                         program_flags)
from agent.bpf.errors import BpfLoadError
from agent.errors import ConfigError

MOUNTS = """\
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_compile_flags_pass_host_order_redirect(tmp_path):
    flags = compile_flags(tmp_path, "10.200.1.1", 15001)
    assert f"-I{tmp_path}" in flags and f"-I{tmp_path / 'include'}" in flags
    assert "-DREDIR_IP=180879617u" in flags  # 10<<24 | 200<<16 | 1<<8 | 1
    assert "-DREDIR_PORT=15001" in flags


@pytest.mark.parametrize("ip, port, field", [("nope", 15001, "capture.redirect_address"),
                                             ("0.0.0.0", 15001, "capture.redirect_address"),
                                             ("10.0.0.1", 0, "proxy.outbound_port")])
def test_constructor_validates(ip, port, field, tmp_path):
    with pytest.raises(ConfigError) as info:
        ConnectCapture(ip, port, ["0.0.0.0/0"], tmp_path)
    assert info.value.field == field


def test_constructor_validates_cidrs_before_load(tmp_path):
    with pytest.raises(ConfigError, match="capture_cidrs"):
        ConnectCapture("10.0.0.1", 15001, ["10.0.0.1/8"], tmp_path)


def test_hooks_and_names():
    assert [h.program for h in hooks_for(ROLE_POD)][-1] == "tcpmesh_conn4"  # connect4 goes on last
    assert [h.program for h in hooks_for(ROLE_PROXY)] == ["tcpmesh_sockopt", "tcpmesh_pxops"]
    assert all(len(h.program) <= 15 and h.program.startswith("tcpmesh_") for h in HOOKS)


def test_methods_need_load(tmp_path):
    cap = ConnectCapture("10.0.0.1", 15001, ["0.0.0.0/0"], tmp_path)
    with pytest.raises(NotLoaded):
        cap.counters()
    cap.close()  # nothing attached, nothing loaded: fine


@pytest.mark.parametrize("path", ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified/"])
def test_root_cgroup_refused(path):
    with pytest.raises(ConfigError, match="root cgroup"):
        cgroup_target(path, "proxy", MOUNTS)


def test_outside_cgroup2_refused():
    with pytest.raises(ConfigError, match="not inside a cgroup v2 mount"):
        cgroup_target("/tmp/x", "pod", MOUNTS)
    with pytest.raises(ConfigError, match="not inside"):
        cgroup_target("/sys/fs/cgroup/cpu/x", "pod", MOUNTS)
    with pytest.raises(ConfigError, match="not inside"):
        cgroup_target("/sys/fs/cgroup/unifiedx/y", "pod", MOUNTS)


def test_child_cgroup_accepted():
    target = cgroup_target("/sys/fs/cgroup/unified/tcpmesh/pod1", "pod", MOUNTS)
    assert target.mount == "/sys/fs/cgroup/unified"
    assert target.path == "/sys/fs/cgroup/unified/tcpmesh/pod1"


def test_load_error_text_names_program_and_keeps_log_tail():
    log = "\n".join(f"line {i}" for i in range(100)) + "\ninvalid bpf_context access off=32 size=8\n"
    err = BpfLoadError("load", "/x/capture_connect.c", "tcpmesh_sockopt", "Permission denied", log)
    text = str(err)
    assert "program tcpmesh_sockopt" in text and "Permission denied" in text
    assert "invalid bpf_context access" in text and "line 0\n" not in text


@pytest.mark.parametrize("release, expected", [("6.18.44-fc-v595", True), ("6.12.0", True), ("7.0.1-rc2", True),
                                               ("6.11.9-200.fc40.x86_64", False), ("5.15.0-91-generic", False),
                                               ("", False), ("weird", False)])
def test_connect_hooks_set_sockops_flags_from_linux_6_12(release, expected):
    """From 6.12 connect4/6 turn on the state callback themselves, and sockops trusts that flag to
    tell a captured socket without a map lookup; older kernels take the lookup path."""
    assert connect_sets_cb_flags(release) is expected
    flags = program_flags("10.0.0.1", 15001, 65536, kernel_release=release)
    assert ("-DTCPMESH_CONNECT_CB_FLAGS=1" in flags) is expected


def test_the_guards_host_network_exemption_is_a_program_flag_so_the_set_name_follows_it():
    """capture.guard_exempt_host_network compiles the agent's netns cookie in; without it the check
    is not in the programs at all, and a set built for another namespace is never adopted."""
    plain = program_flags("10.0.0.1", 15001, 65536, kernel_release="6.18.0")
    assert not any("GUARD_NETNS" in f for f in plain)
    flags = program_flags("10.0.0.1", 15001, 65536, kernel_release="6.18.0", guard_netns_cookie=4097)
    assert flags == plain + ["-DTCPMESH_GUARD_NETNS_COOKIE=4097ull"]


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.11", ["-DTCPMESH_ADMIN_IP=167772171u", "-DTCPMESH_ADMIN_PORT=15020"]),
    ("0.0.0.0", ["-DTCPMESH_ADMIN_IP=0u", "-DTCPMESH_ADMIN_PORT=15020"]),   # every address of the node
    ("127.0.0.1", []),          # a pod's 127.0.0.1 is its own network namespace: nothing to refuse
    ("fd00::11", [])])          # IPv6 admin addresses are refused at accept only
def test_a_pods_connect_to_the_admin_port_is_refused_by_program_flags(address, expected):
    from agent.capture.connect_mode import admin_port_flags

    assert admin_port_flags(address, 15020) == expected
    plain = program_flags("10.0.0.1", 15001, 65536, kernel_release="6.18.0")
    assert program_flags("10.0.0.1", 15001, 65536, kernel_release="6.18.0",
                         admin_endpoint=(address, 15020)) == plain + expected
