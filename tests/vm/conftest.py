"""Fixtures of the vm tier: whether this host can run VMs (probed; ``skip_or_fail`` so CI fails
instead of skipping), the cached image (built once per key, tests/vm/images.py), guests with
tcpmesh from this checkout installed, and a timing record printed at the end of the session.

Every VM a fixture boots is powered off and its run directory removed in ``finally`` — also when
a test fails or the run is interrupted (Ctrl-C reaches pytest, not qemu: see machine.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.vm.images import REPO, ImageError, ImageSpec, cache_dir, ensure_image
from tests.vm.machine import (GUEST_SRC, GUEST_VENV, Machine, checkout_overlay, close_all, install_checkout,  # noqa: F401
                              make_checkout_disk, new_run_dir)

KERNELS = ("5.10", "6.1", "6.12")   # Debian 11, 12, 13
CI_KERNEL = "6.1"                   # the part of the matrix `make test` (.ci/run) runs
HOST_TOOLS = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "chroot", "git")
TIMINGS: list[tuple[str, float]] = []


def kernel_params(kernels=KERNELS, ci: bool = True):
    """pytest params for the matrix (the module marks every test ``vm``); with ``ci`` the CI kernel's
    param is also ``vm_ci``, so `make test` runs it."""
    return [pytest.param(k, id=k, marks=[pytest.mark.vm_ci] if ci and k == CI_KERNEL else []) for k in kernels]


def record(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))


def logs_dir() -> Path:
    """Where the guests' full outputs go (kept after the run; the VMs' own directories are not)."""
    path = Path(os.environ.get("TCPMESH_VM_LOGS") or f"/tmp/tcpmesh-vm-logs/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOGS: list[Path] = []
BACKGROUND_BUILD = pytest.StashKey[tuple[subprocess.Popen, Path]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """A session that will boot VMs starts the image build as its tests begin to run, in the background (`python -m
    tests.vm.images`): with a cold cache it is mostly downloads (≈ 3 CPU-minutes over 10–13 minutes), so
    it runs while the other tiers test instead of before the first VM. ``vm_image`` waits for it; the
    cache's lock keeps it from building twice. Not at collection: `pytest --collect-only` (and a session that
    stops at a collection error) builds nothing. Returns None: pytest's own loop then runs the tests."""
    if session.config.option.collectonly or (session.testsfailed and not
                                              session.config.option.continue_on_collection_errors):
        return
    if os.geteuid() != 0 or not any(item.get_closest_marker("vm") for item in session.items):
        return
    if (cache_dir() / "images" / ImageSpec().key() / "manifest.json").exists():
        return
    log = Path(f"/tmp/tcpmesh-vm-image-build-{os.getpid()}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.vm.images"], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    session.config.stash[BACKGROUND_BUILD] = (proc, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    """An interrupted session stops its background build (SIGTERM: it unmounts and removes what it made)."""
    proc, _ = config.stash.get(BACKGROUND_BUILD, (None, None))
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def save_log(name: str, text: str) -> Path:
    if not _LOGS:
        _LOGS.append(logs_dir())
    path = _LOGS[0] / name
    path.write_text(text)
    return path


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "vm tier timings (seconds)")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:8.1f}  {what}")
    if _LOGS:
        terminalreporter.write_line(f"the guests' full outputs: {_LOGS[0]}")


@pytest.fixture(scope="session")
def vm_host() -> None:
    """Root and the tools that build and boot images (deploy/bootstrap-debian.sh installs them)."""
    if os.geteuid() != 0:
        skip_or_fail("the vm tier needs root (debootstrap, chroot, mkfs.ext4 -d of a root file system)")
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"the vm tier needs {', '.join(missing)}: run `make setup` (deploy/bootstrap-debian.sh "
                     f"installs qemu-system-x86, qemu-utils and debootstrap)")


@pytest.fixture(scope="session")
def vm_image(vm_host, request):
    proc, log = request.config.stash.get(BACKGROUND_BUILD, (None, None))
    if proc is not None:
        proc.wait()   # (if it failed, ensure_image below builds again and says why)
        built_in = re.search(r"built in (\d+)s", log.read_text(errors="replace"))
        if built_in:
            record("image build, cold cache, in the background while the other tiers ran", float(built_in.group(1)))
    try:
        image, built = ensure_image(log=print)
    except ImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    if built is not None:
        record(f"image build {image.path.name} (cold cache)", built)
        for step, seconds in image.manifest["seconds"].items():
            record(f"  of which {step}", seconds)
    return image


@pytest.fixture(scope="session")
def checkout_disk(vm_host, tmp_path_factory) -> Path:
    """This checkout as an ext4 disk image; each guest boots with a copy-on-write overlay of it."""
    return make_checkout_disk(tmp_path_factory.mktemp("vm-checkout") / "src.img")


def prepare_guest(machine: Machine, checkout: Path) -> None:
    """Mount the checkout disk and install tcpmesh from it (editable, no network) into the test venv."""
    record(f"{machine.name}: install the checkout", install_checkout(machine))


@pytest.fixture(scope="module")
def guest(request, vm_image, checkout_disk):
    """One VM per kernel (the module's param), booted once for the module's tests, tcpmesh installed."""
    series = request.param
    run_dir = new_run_dir()
    machines: list[Machine] = []
    try:
        machine = Machine(f"k{series.replace('.', '')}", vm_image, series, run_dir,
                          checkout_disk=checkout_overlay(checkout_disk, run_dir, "src"))
        machines.append(machine)
        machine.start()
        record(f"{machine.name} ({machine.release}, {machine.accel}): boot to channel", machine.boot_seconds)
        prepare_guest(machine, checkout_disk)
        yield machine
    finally:
        for machine in machines:
            record(f"{machine.name}: qemu CPU time, boot to power-off (user+sys)", machine.cpu_seconds())
        close_all(machines, run_dir)
