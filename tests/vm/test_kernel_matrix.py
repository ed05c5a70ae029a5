"""The kernel matrix: Debian 11 (5.10), 12 (6.1) and 13 (6.12) kernels, each in a VM with systemd as
PID 1 and this checkout installed (tests/vm/conftest.py). In each guest, for real:

- `tcpmesh doctor --json` picks the mode docs/kernels.md says for that kernel, reports kernel TLS
  where the kernel has it, and the loader takes the kernel's ebpf-connect path (pre-6.12: records
  keyed by socket cookie; 6.12+: slot arrays), and the data path is the compiled one (built in the guest);
- the bpf tier (tests/bpf) passes with privileged skips turned into failures, so every capture
  mode's programs load, attach and steer on that kernel;
- a two-node lab (the same code as `tcpmesh lab up`) meshes a connection, and after SIGKILL of an
  agent its pod's connections are refused, never sent in plaintext (tests/e2e/test_fail_closed.py);
- the tunnels run kernel TLS where the kernel has it (proxy.kernel_tls auto; tests/vm/guest_kernel_tls.py).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.vm.conftest import GUEST_SRC, GUEST_VENV, kernel_params, record, save_log

pytestmark = pytest.mark.vm

# kernel series -> what `tcpmesh doctor` must pick there, and whether ebpf-connect takes the 6.12 path
EXPECTED_MODE = {"5.10": "ebpf-connect", "6.1": "ebpf-connect", "6.12": "ebpf-connect"}
CONNECT_SETS_CB_FLAGS = {"5.10": False, "6.1": False, "6.12": True}
# doctor's ktls row: Debian builds CONFIG_TLS=m from 6.1 on; Debian 11's 5.10 has it off
# bounds on how long a compile or an adoption takes (tests/conftest.py): software emulation is ~10-20x slower
TIME_SCALE = {"tcg": "20", "kvm": "1"}
KTLS = {"5.10": False, "6.1": True, "6.12": True}


def guest_pytest(guest, paths: str, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    result = guest.run(f"cd {GUEST_SRC} && {GUEST_VENV}/bin/python -m pytest {paths} -q -p no:cacheprovider -ra",
                       env={"TCPMESH_REQUIRE_PRIVILEGED": "1", "TCPMESH_TEST_TIME_SCALE": TIME_SCALE[guest.accel]},
                       timeout=timeout, check=False)
    save_log(f"{guest.name}-pytest-{paths.replace('/', '_')}.log", result.stdout + result.stderr)
    seconds = time.monotonic() - started
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    record(f"{guest.name} ({guest.release}): pytest {paths}: {summary}", seconds)
    assert result.rc == 0, f"in the {guest.release} guest, pytest {paths} failed:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
    return summary, seconds


@pytest.mark.parametrize("guest", kernel_params(), indirect=True)
def test_doctor_picks_the_documented_mode_for_the_kernel(guest):
    series = next(k for k in EXPECTED_MODE if guest.release.startswith(k + ".") or guest.release.startswith(k + "-"))
    started = time.monotonic()
    done = guest.run("tcpmesh doctor --json", timeout=300, check=False)
    record(f"{guest.name} ({guest.release}): tcpmesh doctor --json", time.monotonic() - started)
    report = json.loads(done.stdout)
    assert done.rc == 0, done.stderr
    assert report["selected_mode"] == EXPECTED_MODE[series], report["reason"]
    rows = {c["name"]: c for c in report["checks"]}
    failed = [c for n, c in rows.items() if c["result"] not in ("ok", "warn") and n != "ktls"]
    assert not failed, f"{guest.release}: checks not ok: {failed}"
    assert (rows["ktls"]["result"] == "ok") == KTLS[series], rows["ktls"]
    # pip built agent/proxy/_hotpath.c in the guest (the image has gcc and python3-dev): the compiled data path
    assert report["data_path"]["implementation"] == "compiled", report["data_path"]
    path = guest.run(f"{GUEST_VENV}/bin/python -c 'import os; from agent.capture.connect_mode import "
                     f"connect_sets_cb_flags as f; print(f(os.uname().release))'").stdout.strip()
    assert path == str(CONNECT_SETS_CB_FLAGS[series]), f"{guest.release}: connect_sets_cb_flags -> {path}"


@pytest.mark.parametrize("guest", kernel_params(ci=False), indirect=True)
def test_bpf_tier_passes_in_the_guest(guest):
    guest_pytest(guest, "tests/bpf", timeout=2400)


@pytest.mark.parametrize("guest", kernel_params(), indirect=True)   # 6.1: vm_ci (≈ 3.5 min in the doctor's guest)
def test_lab_meshes_and_fails_closed_after_sigkill_in_the_guest(guest):
    guest_pytest(guest, "tests/e2e/test_fail_closed.py", timeout=1800)


@pytest.mark.parametrize("guest", kernel_params(), indirect=True)   # 6.1: vm_ci, in the doctor's guest
def test_tunnels_run_kernel_tls_where_the_kernel_has_it(guest):
    """proxy.kernel_tls auto in a real agent follows the kernel (kernel TLS on 6.1 and 6.12, user space on 5.10, and
    `tcpmesh status` says which); where the kernel has it, tests/vm/guest_kernel_tls.py: the tunnels really run on
    it in every mix with a user-space end, bytes and half-close intact, close_notify both ways, a changed record
    kills the tunnel and delivers nothing."""
    series = next(k for k in KTLS if guest.release.startswith(k + ".") or guest.release.startswith(k + "-"))
    paths = "tests/integration/test_kernel_tls_agent.py" + (" tests/vm/guest_kernel_tls.py" if KTLS[series] else "")
    guest_pytest(guest, paths, timeout=1800)
