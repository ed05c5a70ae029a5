#!/usr/bin/env bash
# Provisions one tcpmesh node (docs/install-vagrant.md): run by the Vagrantfile on each Debian 12 VM,
# and by tests/e2e/test_install_vagrant.py on this machine with lab node namespaces in place of VMs.
#
# No node's agent holds a key that can sign an SVID (docs/identity.md "The issuer"): node 1 has a third
# role, the demo's issuer host (tcpmesh-issuer.service) and admin machine (the root CA); every node's
# agent, node 1's included, runs in identity.mode issuer with a node credential only (CA:false).
#
# Steps (STEPS, in this order; default all):
#   install   Debian packages and `make install` from the checkout (systemd/install.sh)
#   pods      demo pods: a network namespace, a veth with a /32 and a cgroup each (like the lab's),
#             routes to the other nodes' pod subnets
#   identity  node 1: the root CA (/var/lib/tcpmesh-admin), the issuer's issuing intermediate and token
#             key (/etc/tcpmesh/issuer), a one-time bootstrap token per node; it hands each other node
#             its token and the trust bundle once (vagrant/join_handoff.py); the other nodes fetch theirs
#   config    /etc/tcpmesh/config.yaml, the registry of every node's demo pods, a DENY policy, the
#             tcpmesh-demo helper vagrant/e2e.sh drives; node 1 also /etc/tcpmesh/issuer.yaml
#   start     node 1: systemctl enable --now tcpmesh-issuer; every node: wait for the issuer, systemctl
#             enable --now tcpmesh-agent (returns once the agent sent READY=1: it joined the issuer with
#             its token), then wait until `tcpmesh status` shows every local identity with its SVID
#
# Settings (environment): NODE_INDEX (1, 2, …), NODES ("node1=192.168.56.11 node2=192.168.56.12"),
# CA_TOKEN (shared secret of the join hand-off), and for running elsewhere than a VM:
# TCPMESH_ROOT (prefix of every path written), NETNS_PREFIX, CGROUP_ROOT, CGROUP_BASE, BPFFS_DIR,
# VENV (reuse a venv instead of building /opt/tcpmesh), JOIN_TOKEN_TTL (seconds, default 7200).
set -euo pipefail
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}
STEPS=${STEPS:-install pods identity config start}
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
ISSUER_PORT=${ISSUER_PORT:-15012}
JOIN_TOKEN_TTL=${JOIN_TOKEN_TTL:-7200}   # a provisioning under software emulation can take most of an hour
PYTHON=${VENV:+$VENV/bin/python}
PYTHON=${PYTHON:-/opt/tcpmesh/bin/python}

ETC=$ROOT/etc/tcpmesh
STATE_DIR=$ROOT/run/tcpmesh
LOG_DIR=$ROOT/var/log/tcpmesh
AUDIT_KEY_DIR=$ROOT/var/lib/tcpmesh     # the audit chain's HMAC key: kept across reboots, off the log's directory
ADMIN_DIR=$ROOT/var/lib/tcpmesh-admin     # node 1 only: the root CA and each node's join material
ISSUER_DIR=$ETC/issuer                      # node 1 only: issuer.crt, issuer.key, bundle.pem, token.key
ISSUER_STATE=$ROOT/var/lib/tcpmesh-issuer   # node 1 only: the spent-token ledger (the unit's StateDirectory)
CREDENTIAL_DIR=$ROOT/var/lib/tcpmesh/node-credential   # bundle.pem; the agent writes its node credential here
JOIN_TOKEN=$ETC/join-token
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

step_identity() {
  install -d -m 0755 "$ETC"
  install -d -m 0700 "$ROOT/var/lib/tcpmesh" "$CREDENTIAL_DIR"
  if [ "$NODE_INDEX" = 1 ]; then
    if [ ! -f "$ADMIN_DIR/root-ca/ca.key" ]; then
      install -d -m 0700 "$ADMIN_DIR"
      "$PYTHON" -m agent ca init --trust-domain "$TRUST_DOMAIN" --out "$ADMIN_DIR/root-ca"
    fi
    [ -f "$ISSUER_DIR/issuer.key" ] || "$PYTHON" -m agent ca issue-issuer --ca "$ADMIN_DIR/root-ca" --out "$ISSUER_DIR"
    [ -f "$ISSUER_DIR/token.key" ] || "$PYTHON" -m agent issuer token-key --out "$ISSUER_DIR/token.key" >/dev/null
    install -d -m 0700 "$ISSUER_STATE"
    local name others=()
    for name in "${!ADDRESS[@]}"; do
      # a fresh one-time token per provisioning run: an unused one just expires
      install -d -m 0700 "$ADMIN_DIR/nodes/$name"
      "$PYTHON" -m agent issuer token "$name" --key "$ISSUER_DIR/token.key" --ttl "$JOIN_TOKEN_TTL" \
        | install -m 0600 /dev/stdin "$ADMIN_DIR/nodes/$name/join-token"
      install -m 0644 "$ADMIN_DIR/root-ca/ca.crt" "$ADMIN_DIR/nodes/$name/bundle.pem"
      [ "$name" = "$NODE_NAME" ] || others+=("$name")
    done
    install -m 0600 "$ADMIN_DIR/nodes/$NODE_NAME/join-token" "$JOIN_TOKEN"
    install -m 0644 "$ADMIN_DIR/nodes/$NODE_NAME/bundle.pem" "$CREDENTIAL_DIR/bundle.pem"
    if [ ${#others[@]} -gt 0 ]; then
      # each other node fetches its token and the bundle once, with the shared hand-off token; then it exits
      setsid "$PYTHON" "$SRC/vagrant/join_handoff.py" serve --dir "$ADMIN_DIR/nodes" --bind "$NODE_ADDRESS" \
        --port "$HANDOFF_PORT" --token "${CA_TOKEN:?set CA_TOKEN}" --timeout "${HANDOFF_TIMEOUT:-1800}" \
        "${others[@]}" >"$ADMIN_DIR/handoff.log" 2>&1 < /dev/null &
      echo $! > "$ADMIN_DIR/handoff.pid"
      say "serving ${others[*]}'s join token and trust bundle on $NODE_ADDRESS:$HANDOFF_PORT (pid $!)"
    fi
  else
    local fetched
    fetched=$(mktemp -d)
    "$PYTHON" "$SRC/vagrant/join_handoff.py" fetch --url "http://${ADDRESS[node1]}:$HANDOFF_PORT" \
      --token "${CA_TOKEN:?set CA_TOKEN}" --node "$NODE_NAME" --out "$fetched"
    install -m 0600 "$fetched/join-token" "$JOIN_TOKEN"
    install -m 0644 "$fetched/bundle.pem" "$CREDENTIAL_DIR/bundle.pem"
    rm -rf "$fetched"
  fi
  say "join token in $JOIN_TOKEN, trust bundle in $CREDENTIAL_DIR (no signing key for this node's agent)"
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
identity:
  mode: issuer
  issuer:
    addresses: ["${ADDRESS[node1]}:$ISSUER_PORT"]
    credential_dir: $CREDENTIAL_DIR
    bootstrap_token_file: $JOIN_TOKEN
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
  if [ "$NODE_INDEX" = 1 ]; then
    cat > "$ETC/issuer.yaml" <<EOF
# written by vagrant/provision.sh: the demo's issuer on $NODE_NAME (tcpmesh-issuer.service)
trust_domain: $TRUST_DOMAIN
name: issuer-$NODE_NAME
ca_dir: $ISSUER_DIR
listen: {address: $NODE_ADDRESS, port: $ISSUER_PORT}
registry: {source: file, file: $ETC/workloads.yaml}
tokens: {key_file: $ISSUER_DIR/token.key, spent_dir: $ISSUER_STATE/spent}
metrics: {address: 127.0.0.1, port: 15022}
EOF
  fi
  say "config, registry ($((${#ADDRESS[@]} * PODS_PER_NODE)) pods), policy, tcpmesh-demo written under ${ROOT:-/}"
}

wait_for_issuer() {   # the agent's first start joins the issuer: it must answer first
  local address=${ADDRESS[node1]} i
  for i in $(seq 1 "${ISSUER_WAIT:-900}"); do
    (exec 3<>"/dev/tcp/$address/$ISSUER_PORT") 2>/dev/null && return 0
    sleep 1
  done
  echo "provision $NODE_NAME: the issuer $address:$ISSUER_PORT did not answer (node1: journalctl -u tcpmesh-issuer)" >&2
  return 1
}

wait_for_svids() {   # in issuer mode ready comes before the first SVIDs; the pods' connects wait for them
  local i check='import json, sys
doc = json.load(sys.stdin)
held = {i["spiffe_id"] for i in doc["identities"] if i["state"] == "valid"}
sys.exit(0 if all(w["spiffe_id"] in held for w in doc["workloads"]) else 1)'
  for i in $(seq 1 "${SVID_WAIT:-300}"); do
    "$PYTHON" -m agent status --json --config "$ETC/config.yaml" 2>/dev/null | "$PYTHON" -c "$check" && return 0
    sleep 1
  done
  echo "provision $NODE_NAME: a local identity is still without its SVID from the issuer:" >&2
  "$PYTHON" -m agent status --config "$ETC/config.yaml" >&2 || true
  return 1
}

step_start() {
  systemctl daemon-reload
  if [ "$NODE_INDEX" = 1 ]; then
    systemctl enable --now tcpmesh-issuer  # Type=notify: returns once it listens
    say "tcpmesh-issuer is active: $(systemctl show -p StatusText --value tcpmesh-issuer)"
  fi
  wait_for_issuer
  systemctl enable --now tcpmesh-agent     # Type=notify: returns after READY=1
  systemctl is-active --quiet tcpmesh-agent
  wait_for_svids
  say "tcpmesh-agent is active: $(systemctl show -p StatusText --value tcpmesh-agent); every local identity has its SVID"
}

for step in $STEPS; do
  case $step in
    install|pods|identity|config|start) "step_$step" ;;
    *) echo "provision: unknown step $step (install pods identity config start)" >&2; exit 2 ;;
  esac
done
