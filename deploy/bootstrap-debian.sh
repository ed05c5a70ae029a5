#!/usr/bin/env bash
# Installs what tcpmesh needs on Debian 12, idempotently: Debian packages (bcc, iproute2, netfilter
# tools, tcpdump, openssl) and a venv at $VENV with tcpmesh and its PyPI dependencies, with Debian's
# bcc linked in (bcc is not on PyPI; the PyPI package named "bcc" is unrelated).
# Usage: deploy/bootstrap-debian.sh [VENV] [EXTRAS]      (as root)
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-test}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(libbpfcc python3-bpfcc iproute2 iptables nftables tcpdump bpftool openssl python3-venv
              postgresql-15 redis-server redis-tools  # these three: tests/e2e/test_real_workloads.py
              prometheus)  # tests/e2e/test_telemetry_lab.py scrapes the lab's agents with a real Prometheus
APT_PACKAGES+=(curl jq)  # the tutorial's commands (tests/e2e/test_docs_executed.py runs them)
APT_PACKAGES+=(gcc stunnel4 haproxy iperf3 sockperf)  # make bench: bench/loadgen.c, the two peers, bulk and reference load
APT_PACKAGES+=(python3-dev)  # with gcc: builds agent/proxy/_hotpath.c (setup.py); without it the pure-Python path runs
# tests/*/test_install_*: systemd-analyze verify on the unit, ruby -c on vagrant/Vagrantfile
APT_PACKAGES+=(systemd ruby)
# tests/vm (make test-vm; its vm_ci part in make test): builds Debian images and boots them
APT_PACKAGES+=(qemu-system-x86 qemu-utils debootstrap e2fsprogs)

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: must run as root (it installs Debian packages); try: sudo make $*" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
did=()  # what this run changed, for the summary line
if [ ${#missing[@]} -gt 0 ]; then
  did+=("installed ${#missing[@]} Debian package(s)")
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Packages with services (prometheus, postgresql, redis) must not start them: tests run their own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  did+=("created the venv")
  echo "bootstrap: creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/bcc" ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
stamp="$VENV/.tcpmesh-installed"
# setup.py and the C source too: pip builds agent.proxy._hotpath from them (a new checkout of either rebuilds it)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ agent/proxy/_hotpath.c -nt "$stamp" ] || ! ls agent/proxy/_hotpath.*.so >/dev/null 2>&1; then
  did+=("installed tcpmesh[$EXTRAS] into it")
  echo "bootstrap: installing tcpmesh[$EXTRAS] into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[$EXTRAS]"
  touch "$stamp"
fi
# tests/unit/test_kubernetes_manifests.py runs Debian's kubectl (package kubernetes-client). It is unpacked
# into the venv, not installed: /usr/bin/kubectl may belong to another kubectl package on this machine.
kubectl_dir="$(cd "$VENV" && pwd)/opt/kubernetes-client"
if [ ! -x "$kubectl_dir/usr/bin/kubectl" ]; then
  tmp=$(mktemp -d)
  if mkdir -p "$kubectl_dir" && (cd "$tmp" && apt-get download -qq kubernetes-client 2>/dev/null && dpkg-deb -x kubernetes-client_*.deb "$kubectl_dir"); then
    echo "bootstrap: Debian's kubectl unpacked to $kubectl_dir/usr/bin/kubectl"
  else
    echo "bootstrap: could not fetch Debian's kubernetes-client; the manifest test will say so" >&2
  fi
  rm -rf "$tmp"
fi
"$VENV/bin/python" -c 'import bcc, pyroute2, cryptography, prometheus_client, click' \
  || { echo "bootstrap: the venv at $VENV cannot import its dependencies" >&2; exit 1; }
echo "bootstrap: tunnel data path: $("$VENV/bin/python" -c 'from agent.proxy import hotpath; print(hotpath.describe())')"
summary=$(printf '%s; ' "${did[@]}"); summary=${summary%; }
echo "bootstrap: ready (${summary:-nothing to do, all was in place}): ${#APT_PACKAGES[@]} Debian packages present, tcpmesh $("$VENV/bin/python" -c 'import agent; print(agent.__version__)') in $VENV"
echo "bootstrap: next: source $VENV/bin/activate, then tcpmesh doctor (this host) or tcpmesh lab up (docs/lab.md)"
