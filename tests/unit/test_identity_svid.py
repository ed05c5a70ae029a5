"""X.509-SVIDs: the leaf profile, chain verification by openssl, renewal time, key hygiene."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ca import generate_ca
from agent.identity.errors import SvidError
from agent.identity.spiffe import SpiffeId
from agent.identity.issue import issue_svid
from agent.identity.svid import CLOCK_SKEW_ALLOWANCE, DEV_MIN_TTL_SECONDS, needs_renewal, renewal_time
from tests.conftest import require_binary

TD = "cluster.local"
ALICE = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/alice")


@pytest.fixture(scope="module")
def ca():
    return generate_ca(TD)


def _openssl() -> str:
    return require_binary("openssl", "openssl")


def _verify(tmp_path: Path, ca_pem: str, leaf_pem: str, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "ca.crt").write_text(ca_pem)
    (tmp_path / "leaf.crt").write_text(leaf_pem)
    return subprocess.run([_openssl(), "verify", *extra, "-CAfile", str(tmp_path / "ca.crt"),
                           str(tmp_path / "leaf.crt")], capture_output=True, text=True)


def test_leaf_profile(ca) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    svid = issue_svid(ca, ALICE, 3600, now=now)
    cert = x509.load_pem_x509_certificate(svid.cert_pem.encode())
    assert len(cert.subject) == 0  # no CN: the URI SAN is the only name
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE.uri)]  # only the URI, no DNS/IP
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.issuer == ca.certificate.subject
    assert cert.serial_number == svid.serial > 0
    assert svid.not_before == now - CLOCK_SKEW_ALLOWANCE == cert.not_valid_before_utc
    assert svid.not_after == now + timedelta(seconds=3600) == cert.not_valid_after_utc
    assert svid.spiffe_id == ALICE and svid.chain_pem == () and svid.full_chain_pem == svid.cert_pem


def test_each_svid_has_its_own_key_and_serial(ca) -> None:
    one, two = issue_svid(ca, ALICE, 3600), issue_svid(ca, ALICE, 3600)
    assert one.serial != two.serial and one.key_pem != two.key_pem


def test_openssl_verifies_the_leaf(ca, tmp_path: Path) -> None:
    svid = issue_svid(ca, ALICE, 3600)
    for extra in ((), ("-x509_strict",), ("-purpose", "sslserver"), ("-purpose", "sslclient")):
        out = _verify(tmp_path, ca.cert_pem, svid.cert_pem, *extra)
        assert out.returncode == 0 and ": OK" in out.stdout, (extra, out.stdout + out.stderr)


def test_openssl_rejects_a_leaf_of_another_ca(ca, tmp_path: Path) -> None:
    stranger = issue_svid(generate_ca(TD), ALICE, 3600)
    out = _verify(tmp_path, ca.cert_pem, stranger.cert_pem)
    assert out.returncode != 0


def test_name_constraint_confines_the_ca_to_its_trust_domain(ca, tmp_path: Path) -> None:
    """Even a certificate the CA key signed does not verify if it names another trust domain."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName(
                   [x509.UniformResourceIdentifier("spiffe://evil.example/ns/a/sa/b")]), critical=True))
    foreign = ca.sign(builder).public_bytes(serialization.Encoding.PEM).decode()
    out = _verify(tmp_path, ca.cert_pem, foreign)
    assert out.returncode != 0
    assert "permitted subtree violation" in out.stdout + out.stderr


def test_refuses_another_trust_domain(ca) -> None:
    with pytest.raises(SvidError, match="trust domain 'cluster.local', not 'other.org'"):
        issue_svid(ca, SpiffeId.parse("spiffe://other.org/ns/a/sa/b"), 3600)


def test_refuses_a_tiny_ttl(ca) -> None:
    with pytest.raises(SvidError, match="at least 60 seconds"):
        issue_svid(ca, ALICE, 5)


def test_ttl_is_capped_at_the_ca_expiry() -> None:
    short_ca = generate_ca(TD, valid_days=1)
    svid = issue_svid(short_ca, ALICE, 10 * 86400)
    assert svid.not_after == short_ca.not_after


def test_renewal_at_half_life(ca) -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    svid = issue_svid(generate_ca(TD, now=now - timedelta(days=1)), ALICE, 3600, now=now)
    middle = now + timedelta(minutes=30)  # half the lifetime, counted from issuance (not the back-dated not_before)
    assert svid.issued_at == now and svid.lifetime == timedelta(hours=1)
    assert renewal_time(svid) == middle
    assert not needs_renewal(svid, middle - timedelta(seconds=1))
    assert needs_renewal(svid, middle)


def test_short_ttls_need_the_explicit_floor(ca) -> None:
    """Tests and development can ask for TTLs of seconds; the skew allowance does not eat them."""
    now = datetime.now(timezone.utc)
    with pytest.raises(SvidError, match="at least 60 seconds"):
        issue_svid(ca, ALICE, 4, now=now)
    svid = issue_svid(ca, ALICE, 4, now=now, min_ttl_seconds=DEV_MIN_TTL_SECONDS)
    assert renewal_time(svid) > now and svid.not_before < now  # still back-dated for skew
    with pytest.raises(SvidError, match=f"at least {DEV_MIN_TTL_SECONDS} seconds"):
        issue_svid(ca, ALICE, 1, min_ttl_seconds=0)  # the floor cannot be lowered further


def test_repr_and_str_hide_the_key(ca) -> None:
    svid = issue_svid(ca, ALICE, 3600)
    key_body = "".join(svid.key_pem.splitlines()[1:-1])
    for text in (repr(svid), str(svid), f"{svid}", repr([svid]), repr({ALICE: svid})):
        assert "PRIVATE KEY" not in text and key_body[:16] not in text
        assert ALICE.uri in text
