"""Node intermediates: their profile, the chains they issue (checked by openssl), the name constraint,
the node CA directory's files and modes, and every way loading one can go wrong."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import fingerprint
from agent.identity.ca import generate_ca, init_ca, load_ca
from agent.identity.errors import CaError, SvidError
from agent.identity.node_ca import (BUNDLE_FILE, NODE_CERT_FILE, NODE_KEY_FILE, issue_node_ca, issue_node_files,
                                    load_node_ca, load_root_as_signing_ca, node_name_of)
from agent.identity.spiffe import SpiffeId
from agent.identity.issue import issue_svid
from tests.conftest import require_binary

TD = "cluster.local"
WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


@pytest.fixture(scope="module")
def root():
    return generate_ca(TD)


@pytest.fixture(scope="module")
def node1(root):
    return issue_node_ca(root, "node1")


@pytest.fixture
def dirs(tmp_path):
    init_ca(TD, tmp_path / "root")
    return tmp_path / "root", tmp_path / "node1"


def _openssl() -> str:
    return require_binary("openssl", "openssl")


def openssl_verify(tmp_path: Path, root_pem: str, chain_pems: tuple[str, ...], leaf_pem: str,
                   *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "root.pem").write_text(root_pem)
    (tmp_path / "untrusted.pem").write_text("".join(chain_pems))
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    args = [_openssl(), "verify", "-x509_strict", *extra, "-CAfile", str(tmp_path / "root.pem")]
    if chain_pems:
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    return subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True)


def test_intermediate_profile(root, node1) -> None:
    cert = node1.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    names = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert names.critical and names.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.issuer == root.certificate.subject and not node1.is_root
    assert node_name_of(cert) == "node1" and node1.trust_domain == TD
    assert node1.not_after <= root.not_after
    # a leaf it signs presents the intermediate after itself; the root is never sent
    svid = issue_svid(node1, WEB, 3600)
    assert svid.chain_pem == (node1.cert_pem,)


def test_openssl_verifies_leaf_and_intermediate_against_the_root(root, node1, tmp_path) -> None:
    svid = issue_svid(node1, WEB, 3600)
    for extra in ((), ("-purpose", "sslserver"), ("-purpose", "sslclient")):
        out = openssl_verify(tmp_path, root.cert_pem, svid.chain_pem, svid.cert_pem, *extra)
        assert out.returncode == 0 and ": OK" in out.stdout, (extra, out.stdout + out.stderr)
    # without the intermediate the leaf does not chain; against another root it does not either
    assert openssl_verify(tmp_path, root.cert_pem, (), svid.cert_pem).returncode != 0
    assert openssl_verify(tmp_path, generate_ca(TD).cert_pem, svid.chain_pem, svid.cert_pem).returncode != 0


def test_name_constraint_stops_the_intermediate_issuing_outside_its_trust_domain(root, node1, tmp_path) -> None:
    """Even a certificate the node key signed does not verify if it names another trust domain."""
    with pytest.raises(SvidError, match="this CA serves trust domain 'cluster.local'"):
        issue_svid(node1, SpiffeId.parse("spiffe://evil.example/ns/shop/sa/web"), 3600)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(
                   [x509.UniformResourceIdentifier("spiffe://evil.example/ns/shop/sa/web")]), critical=True))
    forged = node1.sign(builder).public_bytes(serialization.Encoding.PEM).decode()
    out = openssl_verify(tmp_path, root.cert_pem, (node1.cert_pem,), forged)
    assert out.returncode != 0 and "permitted subtree violation" in out.stdout + out.stderr


def test_pathlen_zero_stops_the_intermediate_making_a_ca(root, node1, tmp_path) -> None:
    with pytest.raises(CaError, match="issued by the root CA"):
        issue_node_ca(node1, "node2")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    sub = node1.sign(x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=sub,O=x"))
                     .public_key(key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}")]),
                                    critical=False)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    from agent.identity.ca import CertificateAuthority

    leaf = issue_svid(CertificateAuthority(sub, key), WEB, 3600)
    sub_pem = sub.public_bytes(serialization.Encoding.PEM).decode()
    out = openssl_verify(tmp_path, root.cert_pem, (sub_pem, node1.cert_pem), leaf.cert_pem)
    assert out.returncode != 0 and "path length" in out.stdout + out.stderr


def test_issue_node_files_writes_the_directory_with_private_key_0600(dirs) -> None:
    root_dir, out = dirs
    old = os.umask(0)
    try:
        files = issue_node_files(root_dir, "node1", out)
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == sorted([NODE_CERT_FILE, NODE_KEY_FILE, BUNDLE_FILE])
    assert stat.S_IMODE((out / NODE_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / NODE_CERT_FILE).stat().st_mode) == 0o644
    assert files.node == "node1" and files.trust_domain == TD
    signing = load_node_ca(out, node="node1")
    assert signing.node == "node1" and not signing.ca.is_root
    assert signing.bundle.fingerprints == (fingerprint(load_ca(root_dir).certificate),)
    assert signing.root == load_ca(root_dir).certificate
    assert "PRIVATE" not in repr(signing)


def test_reissuing_renews_the_intermediate_and_keeps_extra_roots(dirs, tmp_path) -> None:
    root_dir, out = dirs
    first = issue_node_files(root_dir, "node1", out)
    extra = generate_ca(TD)
    (out / BUNDLE_FILE).write_text((out / BUNDLE_FILE).read_text() + extra.cert_pem)  # mid-rotation bundle
    second = issue_node_files(root_dir, "node1", out)
    assert second.serial != first.serial
    assert load_node_ca(out).bundle.fingerprints == (fingerprint(load_ca(root_dir).certificate),
                                                     fingerprint(extra.certificate))


def test_issue_refuses_another_nodes_directory_and_a_bundle_without_the_root(dirs, tmp_path) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    with pytest.raises(CaError, match="holds the node CA of 'node1', not 'node2'.*--force"):
        issue_node_files(root_dir, "node2", out)
    init_ca(TD, tmp_path / "other-root")
    with pytest.raises(CaError, match="does not contain the root.*rotate add-root"):
        issue_node_files(tmp_path / "other-root", "node1", out)
    issue_node_files(tmp_path / "other-root", "node1", out, force=True)
    assert load_node_ca(out).root == load_ca(tmp_path / "other-root").certificate
    with pytest.raises(CaError, match="node name 'Node 1' is not valid"):
        issue_node_files(root_dir, "Node 1", tmp_path / "x")


def test_load_missing_directory_says_how_to_issue(tmp_path) -> None:
    with pytest.raises(CaError, match=r"node.crt does not exist; issue this node's CA with `tcpmesh ca issue-node"):
        load_node_ca(tmp_path / "nowhere")


def test_load_refuses_a_readable_key(dirs) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    (out / NODE_KEY_FILE).chmod(0o640)
    with pytest.raises(CaError, match=f"mode 0640.*chmod 600 {out / NODE_KEY_FILE}"):
        load_node_ca(out)


def test_load_refuses_a_key_of_another_certificate_without_echoing_it(dirs, tmp_path) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    issue_node_files(root_dir, "node2", tmp_path / "node2")
    shutil.copy(tmp_path / "node2" / NODE_KEY_FILE, out / NODE_KEY_FILE)
    with pytest.raises(CaError, match="does not belong to") as err:
        load_node_ca(out)
    key_body = "".join((out / NODE_KEY_FILE).read_text().splitlines()[1:-1])
    assert key_body[:16] not in str(err.value)


def test_load_refuses_the_root_in_place_of_an_intermediate(dirs) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    shutil.copy(root_dir / "ca.crt", out / NODE_CERT_FILE)
    shutil.copy(root_dir / "ca.key", out / NODE_KEY_FILE)
    with pytest.raises(CaError, match="is a root CA: an agent holds a node intermediate only"):
        load_node_ca(out)


def test_load_refuses_an_intermediate_of_a_root_not_in_the_bundle(dirs, tmp_path) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    (out / BUNDLE_FILE).write_text(generate_ca(TD).cert_pem)
    with pytest.raises(CaError, match="was not issued by any root in .*bundle.pem"):
        load_node_ca(out)


def test_load_refuses_another_nodes_intermediate_and_an_expired_one(dirs) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out, valid_days=1)
    with pytest.raises(CaError, match="issued for node 'node1', this is node 'node2'"):
        load_node_ca(out, node="node2")
    with pytest.raises(CaError, match="expired on"):
        load_node_ca(out, now=datetime.now(timezone.utc) + timedelta(days=2))


def test_load_refuses_a_leaf_in_the_bundle(dirs) -> None:
    root_dir, out = dirs
    issue_node_files(root_dir, "node1", out)
    leaf = issue_svid(load_node_ca(out).ca, WEB, 3600)
    (out / BUNDLE_FILE).write_text((out / BUNDLE_FILE).read_text() + leaf.cert_pem)
    with pytest.raises(CaError, match="not a self-signed root"):
        load_node_ca(out)


def test_root_as_signing_ca_is_the_development_shortcut(dirs) -> None:
    root_dir, _ = dirs
    signing = load_root_as_signing_ca(root_dir)
    assert signing.ca.is_root and signing.node is None and "development" in signing.kind
    assert signing.root == signing.ca.certificate
