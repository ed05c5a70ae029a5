"""The root CA: the certificate it makes, the files it writes, and loading them back."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import files as files_module
from agent.identity.ca import CA_CERT_FILE, CA_KEY_FILE, CaError, generate_ca, init_ca, load_ca
from tests.conftest import require_binary


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero():
    """The most permissive umask: file modes must come from the code, not the environment."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_ca_certificate_profile() -> None:
    ca = generate_ca("cluster.local", valid_days=30)
    cert = ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]
    constraints_nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints_nc.critical
    assert constraints_nc.value.permitted_subtrees == [x509.UniformResourceIdentifier("cluster.local")]
    assert cert.subject == cert.issuer and ca.is_root and ca.leaf_chain_pem == ()
    assert ca.trust_domain == "cluster.local"
    assert ca.not_after - datetime.now(timezone.utc) > timedelta(days=29)


def test_generate_ca_rejects_bad_trust_domain() -> None:
    with pytest.raises(CaError, match="trust domain 'Bad_Domain!'"):
        generate_ca("Bad_Domain!")


def test_init_ca_writes_key_0600_and_cert_0644(tmp_path: Path, umask_zero) -> None:
    files = init_ca("cluster.local", tmp_path / "ca")
    assert files.cert_path == tmp_path / "ca" / CA_CERT_FILE
    assert _mode(files.key_path) == 0o600
    assert _mode(files.cert_path) == 0o644
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [CA_CERT_FILE, CA_KEY_FILE]  # no temp files left
    assert b"PRIVATE KEY" in files.key_path.read_bytes()
    assert files.trust_domain == "cluster.local"


def test_init_ca_creates_the_key_file_with_0600(tmp_path: Path, monkeypatch) -> None:
    """Never world-readable even briefly: the mode is given to open(2), not set afterwards."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, **kwargs):
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(files_module.os, "open", recording_open)  # write_file_atomic lives in files.py
    init_ca("cluster.local", tmp_path)
    key_creations = [mode for path, mode in created if ".ca.key." in path]
    assert key_creations == [0o600]


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path)
    before = (tmp_path / CA_CERT_FILE).read_bytes(), (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(CaError, match=r"already holds a CA \(ca.crt, ca.key\).*--force"):
        init_ca("cluster.local", tmp_path)
    assert ((tmp_path / CA_CERT_FILE).read_bytes(), (tmp_path / CA_KEY_FILE).read_bytes()) == before


def test_init_ca_refuses_even_a_lone_key(tmp_path: Path) -> None:
    (tmp_path / CA_KEY_FILE).write_text("old")
    with pytest.raises(CaError, match=r"already holds a CA \(ca.key\)"):
        init_ca("cluster.local", tmp_path)


def test_init_ca_overwrites_when_asked(tmp_path: Path, umask_zero) -> None:
    init_ca("cluster.local", tmp_path)
    before = (tmp_path / CA_CERT_FILE).read_bytes()
    init_ca("cluster.local", tmp_path, overwrite=True)
    assert (tmp_path / CA_CERT_FILE).read_bytes() != before
    assert _mode(tmp_path / CA_KEY_FILE) == 0o600
    load_ca(tmp_path)


def test_load_round_trip(tmp_path: Path) -> None:
    files = init_ca("example.org", tmp_path)
    ca = load_ca(tmp_path)
    assert ca.trust_domain == "example.org"
    assert ca.cert_pem == files.cert_path.read_text()


def test_load_missing_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(CaError) as err:
        load_ca(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / CA_CERT_FILE) in str(err.value)
    assert "tcpmesh ca init" in str(err.value)


def test_load_missing_key(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path)
    (tmp_path / CA_KEY_FILE).unlink()
    with pytest.raises(CaError, match=f"{tmp_path / CA_KEY_FILE} does not exist"):
        load_ca(tmp_path)


def test_load_garbled_cert(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path)
    (tmp_path / CA_CERT_FILE).write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    with pytest.raises(CaError, match=f"{tmp_path / CA_CERT_FILE} is not a PEM certificate.*restore it"):
        load_ca(tmp_path)


def test_load_garbled_key_does_not_echo_it(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path)
    key_path = tmp_path / CA_KEY_FILE
    garbled = key_path.read_text().replace("A", "B", 5)[:-40]
    key_path.write_text(garbled)
    with pytest.raises(CaError, match=f"{key_path} is not a PEM private key") as err:
        load_ca(tmp_path)
    body = "".join(garbled.splitlines()[1:3])
    assert body[:20] not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_load_mismatched_key(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path / "one")
    init_ca("cluster.local", tmp_path / "two")
    shutil.copy(tmp_path / "two" / CA_KEY_FILE, tmp_path / "one" / CA_KEY_FILE)
    with pytest.raises(CaError, match=r"ca.key does not belong to .*ca.crt.*Put back the ca.key"):
        load_ca(tmp_path / "one")


def test_load_refuses_a_readable_key(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path)
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(CaError, match=f"mode 0644.*chmod 600 {tmp_path / CA_KEY_FILE}"):
        load_ca(tmp_path)
    load_ca(tmp_path, require_private_key_mode=False)


def test_load_refuses_an_expired_ca(tmp_path: Path) -> None:
    init_ca("cluster.local", tmp_path, valid_days=1)
    with pytest.raises(CaError, match="expired on"):
        load_ca(tmp_path, now=datetime.now(timezone.utc) + timedelta(days=2))


def test_load_refuses_a_leaf_as_ca(tmp_path: Path) -> None:
    from agent.identity.spiffe import SpiffeId
    from agent.identity.issue import issue_svid

    svid = issue_svid(generate_ca("cluster.local"), SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"), 3600)
    (tmp_path / CA_CERT_FILE).write_text(svid.cert_pem)
    (tmp_path / CA_KEY_FILE).write_text(svid.key_pem)
    (tmp_path / CA_KEY_FILE).chmod(0o600)
    with pytest.raises(CaError, match="is not a CA certificate"):
        load_ca(tmp_path)


def test_repr_hides_the_key() -> None:
    ca = generate_ca("cluster.local")
    assert "cluster.local" in repr(ca)
    assert "PRIVATE" not in repr(ca) and "PRIVATE" not in str(ca)


def test_openssl_accepts_the_root(tmp_path: Path) -> None:
    openssl = require_binary("openssl", "openssl")
    init_ca("cluster.local", tmp_path)
    out = subprocess.run([openssl, "verify", "-x509_strict", "-CAfile", tmp_path / CA_CERT_FILE,
                          tmp_path / CA_CERT_FILE], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
