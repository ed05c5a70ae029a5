#!/usr/bin/env bash
# The two-VM end to end check (docs/install-vagrant.md): after `vagrant up`, from the vagrant/
# directory on the host. The same assertions as the lab's e2e tests, across two real VMs:
# bytes arrive intact, the wire carries TLS and never the plaintext, both agents count the flow
# under the pods' identities, and a DENY policy refuses a connection fast.
#
# tests/e2e/test_install_vagrant.py runs this very script on lab node namespaces instead of VMs:
# E2E_NETNS_PREFIX and E2E_ROOTS set → "on NODE …" is nsenter into that netns, not `vagrant ssh`.
set -euo pipefail
cd "$(dirname "$0")"
E2E_NETNS_PREFIX=${E2E_NETNS_PREFIX:-}
E2E_ROOTS=${E2E_ROOTS:-}
MIB=$((1024 * 1024))
checks=0

on() {   # on NODE ARGS…: run `tcpmesh-demo ARGS…` as root on NODE
  local node=$1
  shift
  if [ -n "$E2E_NETNS_PREFIX" ]; then
    nsenter --net="/run/netns/$E2E_NETNS_PREFIX$node" "$E2E_ROOTS/$node/usr/local/sbin/tcpmesh-demo" "$@"
  else
    vagrant ssh "$node" -c "sudo /usr/local/sbin/tcpmesh-demo $(printf '%q ' "$@")" -- -q
  fi
}

check() {   # check NODE ARGS…: one assertion, counted
  on "$@"
  checks=$((checks + 1))
}

cleanup() { on node2 stop-servers >/dev/null || true; }
trap cleanup EXIT

IP21=$(on node2 pod-ip n2p1)
IP22=$(on node2 pod-ip n2p2)
on node2 serve n2p1 7001 echo
on node2 serve n2p2 7004 digest

check node1 echo-check n1p1 "$IP21" 7001 $((4 * MIB))
check node1 wire-check n1p1 "$IP21" 7001
check node1 metrics-check source n1p1 n2p1
check node2 metrics-check destination n1p1 n2p1
check node1 deny-check n1p2 "$IP22" 7004
echo "e2e: $checks passed, 0 failed"
