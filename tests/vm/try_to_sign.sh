#!/bin/sh
# What an attacker who owns a node tries first (run inside a VM by tests/vm/test_systemd_two_vms.py):
# find every private key under DIR..., pair it with every certificate there whose public key is that
# key's, sign a workload SVID for an identity nobody placed on the node with the pair, and verify the
# forgery against the mesh's trust bundle the way a peer's TLS does (the certificate file as the chain).
#
#   try_to_sign.sh TRUST_DOMAIN BUNDLE DIR...
#
# One line per pair ("SIGNS: …" or "refused: …"), then "pairs N signs M"; exit 1 when any forged SVID
# verifies, i.e. when the node holds a key that can sign an identity. openssl(1) only.
set -u
td=$1 bundle=$2
shift 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keys=$(grep -rlI -e '-----BEGIN .*PRIVATE KEY-----' "$@" 2>/dev/null)
certs=$(grep -rlI -e '-----BEGIN CERTIFICATE-----' "$@" 2>/dev/null)
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/forged.key" -subj "/O=forged" \
  -addext "subjectAltName=critical,URI:spiffe://$td/ns/forged/sa/forged" -out "$work/forged.csr" 2>/dev/null || {
  echo "try_to_sign: openssl cannot make a CSR" >&2; exit 2; }
pairs=0 signs=0
for key in $keys; do
  key_pub=$(openssl pkey -in "$key" -pubout 2>/dev/null) || continue
  for cert in $certs; do
    [ "$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null)" = "$key_pub" ] || continue
    pairs=$((pairs + 1))
    if ! openssl x509 -req -in "$work/forged.csr" -CA "$cert" -CAkey "$key" -set_serial 1 -days 1 \
         -copy_extensions copy -out "$work/forged.pem" 2>"$work/sign.err"; then
      echo "refused: $key with $cert: openssl would not sign: $(head -n1 "$work/sign.err")"
      continue
    fi
    if verdict=$(openssl verify -CAfile "$bundle" -untrusted "$cert" "$work/forged.pem" 2>&1); then
      echo "SIGNS: $key with $cert: a forged SVID for spiffe://$td/ns/forged/sa/forged verifies against $bundle"
      signs=$((signs + 1))
    else
      echo "refused: $key with $cert: $(echo "$verdict" | grep -m1 'error' || echo "$verdict" | tail -n1)"
    fi
  done
done
echo "pairs $pairs signs $signs"
[ "$signs" = 0 ]
