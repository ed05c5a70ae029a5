#!/usr/bin/env bash
# `make install`: tcpmesh from this checkout into a venv, the systemd unit, a default config.
# Idempotent; never overwrites a config that exists; never starts or enables the unit.
# As root on Debian 12 (docs/install-systemd.md). Settings, from the environment:
#   DESTDIR      staging root; everything goes below it, systemd is not told (default: empty)
#   PREFIX       the venv, with bcc from Debian linked in, and tcpmesh's own copy of the sources
#                under PREFIX/src (default /opt/tcpmesh); upgrade: make install, systemctl restart
#   PIP_ARGS     extra pip arguments (e.g. --no-index --no-deps --no-build-isolation offline)
#   VENV         an existing venv (with tcpmesh installed) to link instead of building PREFIX
#   EXTRAS       pip extras, e.g. "kubernetes" (default: none)
#   INSTALL_APT  0: do not install the Debian packages the agent needs (default 1)
#   REQUIRE_COMPILED  1: fail (exit 1) when the compiled data path was not built (default 0: warn)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/tcpmesh}
VENV=${VENV:-}
EXTRAS=${EXTRAS:-}
INSTALL_APT=${INSTALL_APT:-1}
PYTHON=${PYTHON:-python3}
BINDIR=/usr/local/bin
UNITDIR=/etc/systemd/system
# What the agent runs with: bcc (loader), libbpf (attach), iproute2/nftables/iptables (ebpf-tc and
# iptables modes), bpftool (tcpmesh doctor); python3-venv for the venv.
RUNTIME_PACKAGES=(libbpfcc python3-bpfcc iproute2 nftables iptables bpftool python3-venv)
# What pip builds the compiled data path with (agent/proxy/_hotpath.c, setup.py) when it installs PREFIX:
# without them the install goes on and the agent runs the pure-Python fallback (docs/install-systemd.md,
# "The tunnel data path"); the end of the install says which one was built.
BUILD_PACKAGES=(gcc python3-dev)   # python3-dev brings libc6-dev (libexpat1-dev depends on it)
REQUIRE_COMPILED=${REQUIRE_COMPILED:-0}

say() { echo "install: $*"; }

# Which tunnel data path the installed agent runs: agent.proxy.hotpath.describe(), what `tcpmesh doctor`
# shows. Imported from /, so that it is the installed agent and not a checkout in the current directory.
describe_data_path() {
  local described
  described=$(cd / && env -u TCPMESH_HOTPATH "$1" -c 'from agent.proxy import hotpath; print(hotpath.describe())' 2>&1) \
    || described="unknown (agent.proxy.hotpath does not import: $described)"
  echo "$described"
}

# Said last, loudly on stderr when it is the pure-Python fallback: why, what it costs, the fix.
report_data_path() {
  local python=$1 described=$2 rebuild=$3 fix=$4 include cause
  if [ "${described#compiled}" != "$described" ]; then
    say "tunnel data path: $described"
    return 0
  fi
  include=$(cd / && "$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
  if ! command -v "${CC:-gcc}" >/dev/null 2>&1; then
    cause="no C compiler (${CC:-gcc}) on this host"
  elif [ ! -e "$include/Python.h" ]; then
    cause="no Python headers ($include/Python.h, Debian package python3-dev)"
  else
    cause="the build failed (the compiler's error: $rebuild, without -q)"
  fi
  {
    echo "install: ==================================================================================="
    echo "install: WARNING: tunnel data path: $described"
    echo "install: The agent will run the PURE-PYTHON FALLBACK, not the compiled hot path: $cause."
    echo "install: It works the same, slower (docs/install-systemd.md \"The tunnel data path\")."
    echo "install: Fix: apt-get install ${BUILD_PACKAGES[*]}; $fix; systemctl restart tcpmesh-agent if it"
    echo "install: runs. tcpmesh doctor shows the data path. REQUIRE_COMPILED=1 makes this an error."
    echo "install: ==================================================================================="
  } >&2
}

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install: must run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi

if [ "$INSTALL_APT" = 1 ]; then
  missing=()
  wanted=("${RUNTIME_PACKAGES[@]}")
  [ -n "$VENV" ] || wanted+=("${BUILD_PACKAGES[@]}")   # an existing venv is not built here
  for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    case " ${missing[*]} " in
      *" gcc "*|*" python3-dev "*) say "Debian packages: ${missing[*]} (${BUILD_PACKAGES[*]}: to build the compiled data path)" ;;
      *) say "Debian packages: ${missing[*]}" ;;
    esac
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ -n "$VENV" ]; then
  venv=$(cd "$VENV" && pwd)
  [ -x "$venv/bin/tcpmesh" ] || { echo "install: VENV=$VENV has no bin/tcpmesh" >&2; exit 1; }
  say "using the existing venv $venv"
  python=$venv/bin/python rebuild="$venv/bin/pip install -e <its source tree>"
  fix="$rebuild (make install links VENV, it does not build it)"
else
  venv=$PREFIX
  target="$DESTDIR$PREFIX"
  if [ ! -x "$target/bin/python" ]; then
    say "venv $target"
    "$PYTHON" -m venv "$target"
  fi
  site=$("$target/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # bcc is not on PyPI (the PyPI package named "bcc" is unrelated): link Debian's python3-bpfcc.
  [ -e "$site/bcc" ] || ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
  # The agent reads bpf/ (C sources, kernel header stub) through agent/bpf_sources, a symlink to ../bpf in
  # a source tree (a wheel carries a copy instead): the install keeps a source tree of its own under
  # PREFIX/src (not the checkout) and installs that one in editable mode.
  src="$target/src"
  rm -rf "$src.new"
  mkdir -p "$src.new"
  cp -a "$SRC/pyproject.toml" "$SRC/setup.py" "$SRC/README.md" "$SRC/agent" "$SRC/bpf" "$src.new/"
  # the checkout's build of agent/proxy/_hotpath.c is for its own venv: pip builds the install's own (setup.py)
  find "$src.new" -name __pycache__ -prune -exec rm -rf {} +
  find "$src.new" -name '*.so' -delete
  rm -rf "$src"
  mv "$src.new" "$src"
  say "pip install -e $src${EXTRAS:+[$EXTRAS]} into $target"
  "$target/bin/pip" install -q --disable-pip-version-check ${PIP_ARGS:-} -e "$src${EXTRAS:+[$EXTRAS]}"
  python=$target/bin/python rebuild="$target/bin/pip install -e $src" fix="make install again"
fi
described=$(describe_data_path "$python")
if [ "$REQUIRE_COMPILED" = 1 ] && [ "${described#compiled}" = "$described" ]; then
  report_data_path "$python" "$described" "$rebuild" "$fix"
  echo "install: REQUIRE_COMPILED=1: stopped before the unit, the link and the config were installed" >&2
  exit 1
fi

install -d -m 0755 "$DESTDIR$BINDIR" "$DESTDIR$UNITDIR" "$DESTDIR/etc/tcpmesh" "$DESTDIR/etc/tcpmesh/policies" \
  "$DESTDIR/etc/default" "$DESTDIR$PREFIX/share/doc"
# the unit's StateDirectory and the node credential's directory: the root CA goes there as bundle.pem before
# the first start (docs/install-systemd.md), so it must exist now; root only, as the unit keeps it
install -d -m 0700 "$DESTDIR/var/lib/tcpmesh" "$DESTDIR/var/lib/tcpmesh/node-credential"
ln -sfn "$venv/bin/tcpmesh" "$DESTDIR$BINDIR/tcpmesh"
install -m 0644 "$SRC/systemd/tcpmesh-agent.service" "$DESTDIR$UNITDIR/tcpmesh-agent.service"
install -m 0644 "$SRC/docs/install-systemd.md" "$DESTDIR$PREFIX/share/doc/install-systemd.md"
# The issuer's unit (docs/identity.md "The issuer"): installed, never enabled here — it runs on the issuer's hosts.
install -m 0644 "$SRC/systemd/tcpmesh-issuer.service" "$DESTDIR$UNITDIR/tcpmesh-issuer.service"
install -m 0644 "$SRC/docs/identity.md" "$DESTDIR$PREFIX/share/doc/identity.md"
for pair in "config.yaml:/etc/tcpmesh/config.yaml" "tcpmesh.default:/etc/default/tcpmesh"; do
  src=${pair%%:*} dst=$DESTDIR${pair#*:}
  if [ -e "$dst" ]; then
    say "kept $dst (exists)"
  else
    install -m 0644 "$SRC/systemd/$src" "$dst"
    say "wrote $dst"
  fi
done
say "$DESTDIR$BINDIR/tcpmesh -> $venv/bin/tcpmesh, unit $DESTDIR$UNITDIR/tcpmesh-agent.service"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "next: set node.name, node.address, capture.redirect_address, capture.pods_cgroup (the node guard) and"
  say "identity.issuer.addresses in /etc/tcpmesh/config.yaml; put a join token (tcpmesh issuer token <node>)"
  say "in /etc/tcpmesh/join-token,"
  say "the root CA in /var/lib/tcpmesh/node-credential/bundle.pem, the registry in /etc/tcpmesh/workloads.yaml, then:"
  say "  systemctl enable --now tcpmesh-agent"
fi
report_data_path "$python" "$described" "$rebuild" "$fix"
