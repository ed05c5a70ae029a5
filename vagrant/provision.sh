#!/usr/bin/env bash
# Provisions one tcpmesh node (docs/install-vagrant.md): run by the Vagrantfile on each Debian 12 VM,
# and by tests/e2e/test_install_vagrant.py on this machine with lab node namespaces in place of VMs.
#
# Steps (STEPS, in this order; default all):
#   install  Debian packages and `make install` from the checkout (systemd/install.sh)
#   pods     demo pods: a network namespace, a veth with a /32 and a cgroup each (like the lab's),
#            routes to the other nodes' pod subnets
#   ca       node 1 is the demo's admin machine: it creates the root CA and every node's intermediate
#            and hands each other node its own directory once (vagrant/ca_handoff.py); the other
#            nodes fetch theirs
#   config   /etc/tcpmesh/config.yaml, the registry of every node's demo pods, a DENY policy, and
#            the tcpmesh-demo helper vagrant/e2e.sh drives
#   start    systemctl enable --now tcpmesh-agent (returns once the agent sent READY=1)
#
# Settings (environment): NODE_INDEX (1, 2, …), NODES ("node1=192.168.56.11 node2=192.168.56.12"),
# CA_TOKEN (shared secret of the CA hand-off), and for running elsewhere than a VM:
# TCPMESH_ROOT (prefix of every path written), NETNS_PREFIX, CGROUP_ROOT, CGROUP_BASE, BPFFS_DIR,
# VENV (reuse a venv instead of building /opt/tcpmesh).
set -euo pipefail
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}
STEPS=${STEPS:-install pods ca config start}
NODE_INDEX=${NODE_INDEX:?set NODE_INDEX (1, 2, ...)}
NODES=${NODES:?set NODES, e.g. "node1=192.168.56.11 node2=192.168.56.12"}
CA_TOKEN=${CA_TOKEN:-}
ROOT=${TCPMESH_ROOT:-}
PODS_PER_NODE=${PODS_PER_NODE:-2}
TRUST_DOMAIN=${TRUST_DOMAIN:-vagrant.tcpmesh}
POD_NAMESPACE=${POD_NAMESPACE:-demo}
NETNS_PREFIX=${NETNS_PREFIX:-tcpmesh-demo-}
CGROUP_ROOT=${CGROUP_ROOT:-$(findmnt -n -t cgroup2 -o TARGET | head -n1)}
CGROUP_BASE=${CGROUP_BASE:-$CGROUP_ROOT/tcpmesh-demo}
BPFFS_DIR=${BPFFS_DIR:-}
POD_SUBNET_PREFIX=10.77
POD_GATEWAY=169.254.1.1
HANDOFF_PORT=${HANDOFF_PORT:-8479}
PYTHON=${VENV:+$VENV/bin/python}
PYTHON=${PYTHON:-/opt/tcpmesh/bin/python}

ETC=$ROOT/etc/tcpmesh
STATE_DIR=$ROOT/run/tcpmesh
LOG_DIR=$ROOT/var/log/tcpmesh
AUDIT_KEY_DIR=$ROOT/var/lib/tcpmesh     # the audit chain's HMAC key: kept across reboots, off the log's directory
ADMIN_DIR=$ROOT/var/lib/tcpmesh-admin     # node 1 only: root CA and every node's intermediate
NODE_NAME=node$NODE_INDEX
declare -A ADDRESS
for entry in $NODES; do ADDRESS[${entry%%=*}]=${entry#*=}; done
NODE_ADDRESS=${ADDRESS[$NODE_NAME]:?"$NODE_NAME is not in NODES=$NODES"}
say() { echo "provision $NODE_NAME: $*"; }

wire_ifname() {   # the interface that holds this node's address
  ip -o -4 addr show | awk -v a="$NODE_ADDRESS" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}'
}

step_install() {
  local missing=()
  for pkg in tcpdump make; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ] && [ "${INSTALL_APT:-1}" = 1 ]; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
  DESTDIR=$ROOT make -C "$SRC" -s install
}

step_pods() {
  [ "$(sysctl -n net.ipv4.ip_forward)" = 1 ] || sysctl -q -w net.ipv4.ip_forward=1
  mkdir -p "$CGROUP_BASE/pods"
  local j pod ns ip
  for j in $(seq 1 "$PODS_PER_NODE"); do
    pod=n${NODE_INDEX}p$j ns=$NETNS_PREFIX$pod ip=$POD_SUBNET_PREFIX.$NODE_INDEX.$((10 + j))
    ip netns list | grep -qx "$ns\( (id: [0-9]*)\)\?" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! ip link show "tm$pod" >/dev/null 2>&1; then
      ip link add "tm$pod" type veth peer name eth0 netns "$ns"
    fi
    ip addr replace "$POD_GATEWAY/32" dev "tm$pod"
    ip link set "tm$pod" up
    ip route replace "$ip/32" dev "tm$pod"
    ip -n "$ns" addr replace "$ip/32" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace "$POD_GATEWAY/32" dev eth0 scope link
    ip -n "$ns" route replace default via "$POD_GATEWAY" dev eth0
    mkdir -p "$CGROUP_BASE/pods/$pod"
    say "pod $pod: netns $ns, $ip, cgroup $CGROUP_BASE/pods/$pod"
  done
  local name
  for name in "${!ADDRESS[@]}"; do
    [ "$name" = "$NODE_NAME" ] && continue
    ip route replace "$POD_SUBNET_PREFIX.${name#node}.0/24" via "${ADDRESS[$name]}"
  done
}

step_ca() {
  install -d -m 0755 "$ETC"
  if [ "$NODE_INDEX" = 1 ]; then
    if [ ! -f "$ADMIN_DIR/root-ca/ca.key" ]; then
      install -d -m 0700 "$ADMIN_DIR"
      "$PYTHON" -m agent ca init --trust-domain "$TRUST_DOMAIN" --out "$ADMIN_DIR/root-ca"
    fi
    local name others=()
    for name in "${!ADDRESS[@]}"; do
      [ -f "$ADMIN_DIR/nodes/$name/node.crt" ] || \
        "$PYTHON" -m agent ca issue-node "$name" --ca "$ADMIN_DIR/root-ca" --out "$ADMIN_DIR/nodes/$name" >/dev/null
      [ "$name" = "$NODE_NAME" ] || others+=("$name")
    done
    rm -rf "$ETC/node-ca" && cp -a "$ADMIN_DIR/nodes/$NODE_NAME" "$ETC/node-ca"
    if [ ${#others[@]} -gt 0 ]; then
      # each other node fetches its own directory once, with the shared token; then the server exits
      setsid "$PYTHON" "$SRC/vagrant/ca_handoff.py" serve --dir "$ADMIN_DIR/nodes" --bind "$NODE_ADDRESS" \
        --port "$HANDOFF_PORT" --token "${CA_TOKEN:?set CA_TOKEN}" --timeout "${HANDOFF_TIMEOUT:-1800}" \
        "${others[@]}" >"$ADMIN_DIR/handoff.log" 2>&1 < /dev/null &
      echo $! > "$ADMIN_DIR/handoff.pid"
      say "serving ${others[*]}'s node CA on $NODE_ADDRESS:$HANDOFF_PORT (pid $!)"
    fi
  else
    "$PYTHON" "$SRC/vagrant/ca_handoff.py" fetch --url "http://${ADDRESS[node1]}:$HANDOFF_PORT" \
      --token "${CA_TOKEN:?set CA_TOKEN}" --node "$NODE_NAME" --out "$ETC/node-ca"
  fi
  say "node CA in $ETC/node-ca"
}

step_config() {
  install -d -m 0755 "$ETC" "$ETC/policies" "$ROOT/usr/local/sbin"
  install -d -m 0700 "$AUDIT_KEY_DIR"
  local ifname
  ifname=$(wire_ifname)
  [ -n "$ifname" ] || { echo "provision: no interface holds $NODE_ADDRESS" >&2; exit 1; }
  cat > "$ETC/config.yaml" <<EOF
# written by vagrant/provision.sh for $NODE_NAME
trust_domain: $TRUST_DOMAIN
state_dir: $STATE_DIR
node: {name: $NODE_NAME, address: $NODE_ADDRESS}
identity: {node_ca_dir: $ETC/node-ca}
registry: {source: file, file: $ETC/workloads.yaml}
policy: {dir: $ETC/policies}
capture:
  mode: ebpf-connect
  redirect_address: $POD_GATEWAY
  cgroup_root: $CGROUP_ROOT
  pods_cgroup: $CGROUP_BASE/pods
  bpffs_dir: "$BPFFS_DIR"
  cgroup_scope: $CGROUP_BASE
admin: {address: $NODE_ADDRESS, port: 15020, socket: $STATE_DIR/agent.sock}
access_log: {path: $LOG_DIR/access.log, key: $AUDIT_KEY_DIR/audit.key}
EOF
  {
    echo "trust_domain: $TRUST_DOMAIN"
    echo "nodes:"
    local name j
    for name in $(printf '%s\n' "${!ADDRESS[@]}" | sort); do echo "  - {name: $name, address: ${ADDRESS[$name]}}"; done
    echo "workloads:"
    for name in $(printf '%s\n' "${!ADDRESS[@]}" | sort); do
      for j in $(seq 1 "$PODS_PER_NODE"); do
        local pod=n${name#node}p$j
        echo "  - {name: $pod, namespace: $POD_NAMESPACE, service_account: $pod, ip: $POD_SUBNET_PREFIX.${name#node}.$((10 + j)), node: $name$( \
          [ "$name" = "$NODE_NAME" ] && echo ", cgroup: $CGROUP_BASE/pods/$pod")}"
      done
    done
  } > "$ETC/workloads.yaml"
  cat > "$ETC/policies/deny-n1p2-to-n2p2.yaml" <<EOF
# vagrant/e2e.sh's policy check: n1p2 may not reach n2p2
kind: AuthorizationPolicy
metadata: {name: deny-n1p2, namespace: $POD_NAMESPACE}
spec:
  selector: {workload: n2p2}
  action: DENY
  rules:
    - from: [{principals: ["spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/n1p2"]}]
EOF
  cat > "$ETC/demo.env" <<EOF
NODE_NAME=$NODE_NAME
NETNS_PREFIX=$NETNS_PREFIX
PODS_CGROUP=$CGROUP_BASE/pods
DEMO_STATE_DIR=$STATE_DIR/demo
ADMIN_URL=http://$NODE_ADDRESS:15020
WIRE_IFNAME=$ifname
TRUST_DOMAIN=$TRUST_DOMAIN
POD_NAMESPACE=$POD_NAMESPACE
POD_SUBNET_PREFIX=$POD_SUBNET_PREFIX
EOF
  cat > "$ROOT/usr/local/sbin/tcpmesh-demo" <<EOF
#!/bin/sh
# vagrant/e2e.sh's node-side helper (vagrant/demo_node.py)
TCPMESH_DEMO_ENV=$ETC/demo.env exec $PYTHON $SRC/vagrant/demo_node.py "\$@"
EOF
  chmod 0755 "$ROOT/usr/local/sbin/tcpmesh-demo"
  say "config, registry ($((${#ADDRESS[@]} * PODS_PER_NODE)) pods), policy, tcpmesh-demo written under ${ROOT:-/}"
}

step_start() {
  systemctl daemon-reload
  systemctl enable --now tcpmesh-agent     # Type=notify: returns after READY=1
  systemctl is-active --quiet tcpmesh-agent
  say "tcpmesh-agent is active: $(systemctl show -p StatusText --value tcpmesh-agent)"
}

for step in $STEPS; do
  case $step in
    install|pods|ca|config|start) "step_$step" ;;
    *) echo "provision: unknown step $step (install pods ca config start)" >&2; exit 2 ;;
  esac
done
