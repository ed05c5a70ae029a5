"""VM images of the vm tier: built from Debian packages only, cached outside the checkout.

Owns: what goes into an image (``ImageSpec``: the suite, the extra kernels' suites, the Debian
packages, the PyPI requirements, the provisioning files), its cache key, and building it —
``debootstrap`` from the Debian package registry, ``tests/vm/image-provision.sh`` in a chroot,
``mkfs.ext4 -d`` into a raw disk image (no loop mounts, no downloaded disk images or boxes).

Cache: ``$TCPMESH_VM_CACHE`` (default /var/cache/tcpmesh-vm), one directory per key under images/,
holding root.img, the kernels and initrds (qemu boots them directly) and manifest.json (the spec and
the build's timings). A key changes, and so an image is rebuilt, only when the suite, a kernel suite,
the package list, the requirements or a provisioning file change. A build goes into a temporary
directory that is renamed into place when complete; an exclusive lock on the cache serialises
builds (two test runs never build at once, the second one uses the first one's image).
Must not import tcpmesh (``agent``): the tier drives the product only inside the guests.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE = "/var/cache/tcpmesh-vm"
CACHE_ENV = "TCPMESH_VM_CACHE"
MIRROR_ENV = "TCPMESH_VM_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_SIZE = "8G"          # sparse; the root file system is ~2 GB
PROVISION_FILES = ("image-provision.sh", "guest_agent.py", "tcpmesh-vm-guest.service")
UNUSED_DAYS = 7            # a cached image no run used for this long is removed after the next build
BUILD_FORMAT = 1           # bump when the layout of a cache entry changes

BASE_INCLUDE = ("systemd-sysv", "udev", "linux-image-amd64", "iproute2", "python3", "kmod", "initramfs-tools")
# What the guests run: tcpmesh's runtime packages and build packages (systemd/install.sh's RUNTIME_PACKAGES
# and BUILD_PACKAGES: gcc and python3-dev build the compiled hot path, so the guests run the data path a
# user's `make install` builds), what bcc needs to compile with the shipped stub (linux-libc-dev), the test
# tools, PostgreSQL for the two-VM test and what vagrant/provision.sh installs (make, tcpdump).
APT_PACKAGES = (
    "libbpfcc", "python3-bpfcc", "linux-libc-dev", "iproute2", "nftables", "iptables", "bpftool",
    "python3-venv", "tcpdump", "openssl", "make", "procps", "util-linux", "postgresql-15", "postgresql-client-15",
    "ca-certificates", "dbus", "gcc", "libc6-dev",   # tests/bpf/test_abi_layout.py compiles the ABI header
    "python3-dev",
)
KERNEL_SUITES = ("bullseye", "trixie")   # Debian 11's 5.10, Debian 13's 6.12; bookworm brings 6.1


class ImageError(RuntimeError):
    """An image cannot be built; the message names the step and what to do."""


@dataclass(frozen=True)
class ImageSpec:
    suite: str = "bookworm"
    kernel_suites: tuple[str, ...] = KERNEL_SUITES
    apt_packages: tuple[str, ...] = APT_PACKAGES
    requirements: tuple[str, ...] = field(default_factory=lambda: tuple(pip_requirements(REPO / "pyproject.toml")))

    def key(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps({"format": BUILD_FORMAT, "suite": self.suite, "kernels": self.kernel_suites,
                                  "apt": sorted(self.apt_packages), "pip": sorted(self.requirements)}).encode())
        for name in PROVISION_FILES:
            digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
        return f"{self.suite}-{digest.hexdigest()[:16]}"


# What the guests run tests with: not the whole `test` extra (its other tools serve tiers that never run
# in a guest, and each addition there would rebuild the image)
GUEST_TEST_TOOLS = ("pytest>=7", "hypothesis>=6")


def pip_requirements(pyproject: Path) -> list[str]:
    """tcpmesh's dependencies, the guests' test tools and the build backend (`make install` runs pip
    with --no-index inside the guests, so setuptools must come from the wheelhouse too)."""
    project = tomllib.loads(pyproject.read_text())
    build = project["build-system"]["requires"]
    return [*project["project"]["dependencies"], *GUEST_TEST_TOOLS, *build, "wheel"]


@dataclass(frozen=True)
class Image:
    """A built image in the cache."""
    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def kernel(self, series: str) -> tuple[Path, Path, str]:
        """(vmlinuz, initrd, release) of the image's kernel of ``series`` ("5.10", "6.1", "6.12")."""
        for release in self.manifest["kernels"]:
            if release.startswith(series + ".") or release.startswith(series + "-"):
                return self.path / f"vmlinuz-{release}", self.path / f"initrd.img-{release}", release
        raise ImageError(f"image {self.path.name} has no {series} kernel (it has {', '.join(self.manifest['kernels'])})")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def cached_image(series: str) -> Image | None:
    """The newest image in the cache that has a kernel of ``series``, built or not by this checkout's spec
    (for tools that must never build one: the benchmarks in guests); None if there is none."""
    manifests = sorted((cache_dir() / "images").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    for manifest in reversed(manifests):
        image = Image(manifest.parent)
        if any(k.startswith(series + ".") or k.startswith(series + "-") for k in image.manifest["kernels"]):
            return image
    return None


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_image(spec: ImageSpec | None = None, log=print) -> tuple[Image, float | None]:
    """The cached image of ``spec``, built first if missing: (image, build seconds or None if cached)."""
    spec = spec or ImageSpec()
    cache = cache_dir()
    final = cache / "images" / spec.key()
    with _locked(cache / "build.lock"):
        if (final / "manifest.json").exists():
            os.utime(final / "manifest.json")
            return Image(final), None
        started = time.monotonic()
        build_image(spec, final, log)
        _prune(final.parent, keep=final, log=log)
        return Image(final), time.monotonic() - started


def _prune(images: Path, keep: Path, log=print) -> None:
    """Remove images no run has used for UNUSED_DAYS (their manifest's mtime is touched on each use)."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for entry in images.iterdir():
        manifest = entry / "manifest.json"
        if entry != keep and manifest.exists() and manifest.stat().st_mtime < cutoff:
            log(f"vm image {entry.name}: unused for {UNUSED_DAYS} days, removed")
            shutil.rmtree(entry, ignore_errors=True)


def build_image(spec: ImageSpec, final: Path, log=print) -> None:
    mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    work = final.parent / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    timings: dict[str, float] = {}
    try:
        work.mkdir(parents=True)
        step = time.monotonic()
        log(f"vm image {final.name}: debootstrap {spec.suite} from {mirror}")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_INCLUDE)}",
              f"--cache-dir={_debs_cache()}", spec.suite, str(root), mirror], "debootstrap", work)
        timings["debootstrap"] = time.monotonic() - step

        step = time.monotonic()
        wheels = root / "opt" / "tcpmesh-wheels"
        wheels.mkdir(parents=True)
        (wheels / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
              "-d", str(wheels), "-r", str(wheels / "requirements.txt")], "pip download (wheelhouse)", work)
        timings["wheels"] = time.monotonic() - step

        step = time.monotonic()
        guest = root / "usr" / "local" / "lib" / "tcpmesh-vm"
        guest.mkdir(parents=True)
        shutil.copy2(HERE / "guest_agent.py", guest / "guest_agent.py")
        shutil.copy2(HERE / "tcpmesh-vm-guest.service", root / "etc" / "systemd" / "system")
        shutil.copy2(HERE / "image-provision.sh", root / "tmp" / "image-provision.sh")
        shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MIRROR": mirror, "KERNEL_SUITES": " ".join(spec.kernel_suites),
               "APT_PACKAGES": " ".join(spec.apt_packages), "WHEELS": "/opt/tcpmesh-wheels", "HOME": "/root"}
        log(f"vm image {final.name}: packages and kernels ({' '.join(spec.kernel_suites)}) in the chroot")
        _run(["chroot", str(root), "/bin/bash", "/tmp/image-provision.sh"], "image-provision.sh", work, env=env)
        (root / "tmp" / "image-provision.sh").unlink()
        (root / "etc" / "resolv.conf").write_text("")
        timings["provision"] = time.monotonic() - step

        step = time.monotonic()
        kernels = sorted(p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*"))
        for release in kernels:
            for prefix in ("vmlinuz-", "initrd.img-"):
                source = root / "boot" / f"{prefix}{release}"
                if not source.exists():
                    raise ImageError(f"image build: {source} is missing (initramfs-tools failed in the chroot?)")
                shutil.copy2(source, work / f"{prefix}{release}")
        _run(["truncate", "-s", IMAGE_SIZE, str(work / "root.img")], "truncate", work)
        _run(["mkfs.ext4", "-q", "-F", "-L", "tcpmesh-root", "-d", str(root), str(work / "root.img")], "mkfs.ext4 -d", work)
        shutil.rmtree(root)
        timings["mkfs"] = time.monotonic() - step
        manifest = {"key": final.name, "suite": spec.suite, "kernel_suites": list(spec.kernel_suites),
                    "apt_packages": list(spec.apt_packages), "requirements": list(spec.requirements),
                    "kernels": kernels, "mirror": mirror, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": {k: round(v, 1) for k, v in timings.items()}}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        log(f"vm image {final.name}: built, kernels {', '.join(kernels)}; seconds {manifest['seconds']}")
    finally:
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


def _unmount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys in the target and a failed run may leave them: never rmtree
    through a mounted /proc. Deepest first."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


def _debs_cache() -> Path:
    path = cache_dir() / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(argv: list[str], step: str, work: Path, env: dict | None = None) -> None:
    log_path = work / "build.log"
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ImageError(f"vm image build failed at {step} (exit {done.returncode}); the log's end:\n{tail}\n"
                         f"fix: check that the Debian package registry is reachable ({MIRROR_ENV} overrides the "
                         f"mirror) and that the packages exist in the suite")


_RELEASE = re.compile(r"^(\d+)\.(\d+)")


def series_of(release: str) -> str:
    """'6.1.0-50-amd64' -> '6.1', '6.12.57+deb13-amd64' -> '6.12'."""
    match = _RELEASE.match(release)
    if not match:
        raise ValueError(f"not a kernel release: {release!r}")
    return f"{match.group(1)}.{match.group(2)}"


def main() -> int:
    """`python -m tests.vm.images`: make sure the image is in the cache (what the vm fixtures do first).
    tests/vm/conftest.py starts it in the background when a session selects vm tests, so a cold cache's
    build — mostly downloads — runs while the other tiers test. SIGTERM stops it cleanly."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the build's finally unmounts and removes
    try:
        image, built = ensure_image(log=lambda line: print(line, flush=True))
    except ImageError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"vm image {image.path.name}: {'built in %.0fs' % built if built is not None else 'cached'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
