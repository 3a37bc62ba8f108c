"""The per-pod CA and its leaves: RFC 5280 profile, verification, refusals, persistence."""

from __future__ import annotations

import datetime as dt
import ipaddress
import pickle
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from sidecar.tls_intercept.ca import PodCA

NOW = time.time()


@pytest.fixture(scope="module")
def ca() -> PodCA:
    return PodCA.create(ttl=3600, now=NOW)


def _verify(ca: PodCA, cert_pem: bytes, host: str, at: float = NOW) -> None:
    leaf = x509.load_pem_x509_certificate(cert_pem)
    verifier = (
        PolicyBuilder()
        .store(Store([ca.cert]))
        .time(dt.datetime.fromtimestamp(at, dt.UTC))
        .build_server_verifier(x509.DNSName(host))
    )
    verifier.verify(leaf, [])


def test_ca_profile(ca: PodCA) -> None:
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    names = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert names.critical and names.value.permitted_subtrees is None
    assert set(names.value.excluded_subtrees or []) == {
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0")),
    }
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == dt.timedelta(seconds=3600 + 60)  # a minute back for clock skew
    assert ca.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE" not in ca.cert_pem
    assert "PRIVATE" not in repr(ca)


def test_leaf_profile_and_verification(ca: PodCA) -> None:
    leaf = ca.issue("api.example.com", ttl=300, now=NOW)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"] and len(list(san)) == 1
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_after - leaf.not_before == pytest.approx(360, abs=1)
    assert leaf.serial == format(cert.serial_number, "x") and "key_pem" not in repr(leaf)
    _verify(ca, leaf.cert_pem, "api.example.com")
    with pytest.raises(VerificationError):
        _verify(ca, leaf.cert_pem, "other.example.com")  # RFC 6125: exactly the name it was minted for
    with pytest.raises(VerificationError):
        _verify(ca, leaf.cert_pem, "api.example.com", at=NOW + 400)  # short-lived


def test_each_leaf_has_its_own_key(ca: PodCA) -> None:
    first, second = (ca.issue("api.example.com", ttl=60, now=NOW) for _ in range(2))
    assert first.key_pem != second.key_pem and first.serial != second.serial


def test_a_leaf_never_outlives_the_ca() -> None:
    short = PodCA.create(ttl=600, now=NOW)
    leaf = short.issue("api.example.com", ttl=7200, now=NOW)
    assert leaf.not_after == pytest.approx(short.not_after)
    with pytest.raises(ValueError, match="expired"):
        short.issue("api.example.com", ttl=60, now=short.not_after + 1)


@pytest.mark.parametrize(
    "host",
    ["*.example.com", "10.0.0.1", "host.123", "bad!name.example.com", "", "UPPER.example.com", "a..b", "x" * 254],
)
def test_refuses_to_certify_anything_but_an_exact_dns_name(ca: PodCA, host: str) -> None:
    with pytest.raises(ValueError):
        ca.issue(host, ttl=60, now=NOW)


def test_save_and_load(tmp_path: Path, ca: PodCA) -> None:
    ca.save(tmp_path)
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    loaded = PodCA.load(tmp_path, now=NOW, min_remaining=600)
    assert loaded is not None and loaded.serial == ca.serial
    _verify(ca, loaded.issue("api.example.com", ttl=60, now=NOW).cert_pem, "api.example.com")
    assert PodCA.load(tmp_path, now=NOW, min_remaining=7200) is None  # expires too soon: make a new one
    assert PodCA.load(tmp_path / "missing", now=NOW, min_remaining=1) is None
    other = PodCA.create(ttl=3600, now=NOW)
    (tmp_path / "ca.pem").write_bytes(other.cert_pem)  # key and certificate do not match
    assert PodCA.load(tmp_path, now=NOW, min_remaining=1) is None


def test_the_ca_cannot_be_pickled(ca: PodCA) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(ca)
