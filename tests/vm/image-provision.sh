#!/usr/bin/env bash
# Runs INSIDE the image's chroot while tests/vm/images.py builds a VM image (never on a real host).
# What the VM tier's guests carry on top of debootstrap's Debian 12 base (tests/README.md, "vm"):
#   - the Debian packages tcpmesh runs with, the tools the tests drive (tcpdump, PostgreSQL, make);
#   - the other kernels of the matrix, from their own suites' pools: Debian 11's 5.10 and Debian
#     13's 6.12 beside bookworm's own 6.1 (one userland, three kernels: tcpmesh needs Python >= 3.11,
#     which Debian 11 does not have, so a Debian 11 user runs it on a newer userland anyway);
#   - a venv with tcpmesh's PyPI dependencies from a wheelhouse the host downloaded (the VMs have
#     no network: `make install` inside runs with PIP_ARGS pointing at the same wheelhouse);
#   - the guest half of the command channel (tests/vm/guest_agent.py, a systemd unit).
# Arguments (environment): MIRROR, KERNEL_SUITES ("bullseye trixie"), APT_PACKAGES, WHEELS (dir).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
: "${MIRROR:?}" "${APT_PACKAGES:?}" "${WHEELS:?}"
KERNEL_SUITES=${KERNEL_SUITES:-}

# Services must not start inside the chroot (PostgreSQL's postinst would).
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d

echo "deb $MIRROR bookworm main" > /etc/apt/sources.list
for suite in $KERNEL_SUITES; do
  echo "deb $MIRROR $suite main" > "/etc/apt/sources.list.d/$suite.list"
  # never a candidate by itself: only the kernel packages named below come from there
  printf 'Package: *\nPin: release n=%s\nPin-Priority: 1\n' "$suite" > "/etc/apt/preferences.d/$suite"
done
# Small initrds (boot time under software emulation): only what a virtio guest needs to mount its root.
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
printf '%s\n' virtio_pci virtio_blk virtio_net virtio_console ext4 > /etc/initramfs-tools/modules
apt-get -qq update
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null

for suite in $KERNEL_SUITES; do
  # the concrete image package the suite's linux-image-amd64 points at, e.g. linux-image-5.10.0-37-amd64
  pkg=$(apt-cache show -o APT::Default-Release="$suite" "linux-image-amd64/$suite" \
        | sed -n 's/^Depends: \(linux-image-[0-9][^ ,]*\).*/\1/p' | head -n1)
  [ -n "$pkg" ] || { echo "image-provision: no kernel package in $suite" >&2; exit 1; }
  echo "image-provision: kernel $pkg from $suite"
  apt-get install -y -qq --no-install-recommends "$pkg/$suite" >/dev/null
done
update-initramfs -u -k all
for suite in $KERNEL_SUITES; do
  rm -f "/etc/apt/sources.list.d/$suite.list" "/etc/apt/preferences.d/$suite"
done
apt-get -qq update || true
apt-get clean

# The test venv: tcpmesh's dependencies and the test tools; tcpmesh itself is installed per run from
# the checkout the tier hands the VM. Debian's bcc linked in, as deploy/bootstrap-debian.sh does.
python3 -m venv /opt/tcpmesh-test
/opt/tcpmesh-test/bin/pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
  -r "$WHEELS/requirements.txt"
site=$(/opt/tcpmesh-test/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

# Boot: root on the first virtio disk, no getty on the serial console (the console log is the
# tier's boot log), no timers that would wake apt, a fixed hostname until a test sets one.
echo "/dev/vda / ext4 defaults 0 1" > /etc/fstab
echo tcpmesh-vm > /etc/hostname
systemctl mask -q serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer man-db.timer 2>/dev/null || true
systemctl disable -q postgresql.service 2>/dev/null || true
systemctl enable -q tcpmesh-vm-guest.service
# The default journal is volatile on a minbase system without /var/log/journal: keep it so
# (every VM is thrown away), but large enough for a test's logs.
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n' > /etc/systemd/journald.conf.d/tcpmesh-vm.conf
rm -f /usr/sbin/policy-rc.d
echo "image-provision: done"
