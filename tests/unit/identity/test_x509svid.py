"""X.509-SVID verification of peers (X509-SVID §4, §5.2; SPIFFE-ID §2), cache and chains."""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.errors import IdentityError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.devca import DevCA
from sidecar.identity.x509svid import X509SvidVerifier, chain_from_xfcc
from tests.support.certs import PEM, key_usage, make_leaf, url_pem

ID = "spiffe://example.org/ns/a/sa/caller"


@pytest.fixture(scope="module")
def cas() -> dict[str, DevCA]:
    return {"example.org": DevCA.create("example.org"), "partner.example": DevCA.create("partner.example")}


@pytest.fixture
def verifier(cas: dict[str, DevCA]) -> X509SvidVerifier:
    return X509SvidVerifier(TrustBundles({td: (ca.ca_cert,) for td, ca in cas.items()}))


def test_valid_svid(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    cert, _ = make_leaf(cas["example.org"], [ID])
    verified = verifier.verify(url_pem(cert), now=time.time())
    assert verified.spiffe_id == ID and verified.trust_domain == "example.org"
    assert verified.serial == format(cert.serial_number, "x")
    assert verified.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def test_federated_trust_domain_uses_its_own_bundle(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    cert, _ = make_leaf(cas["partner.example"], ["spiffe://partner.example/reports/x"])
    assert verifier.verify(url_pem(cert), now=time.time()).trust_domain == "partner.example"


NOW_DT = dt.datetime.now(dt.UTC)  # import time: only for "long ago" / "far ahead" certificates
CASES = [
    ("svid_chain_invalid", lambda c: make_leaf(c["example.org"], [ID], signer=c["partner.example"])),
    (
        "svid_expired",
        lambda c: make_leaf(
            c["example.org"],
            [ID],
            not_before=NOW_DT - dt.timedelta(hours=2),
            not_after=NOW_DT - dt.timedelta(seconds=1),
        ),
    ),
    (
        "svid_not_yet_valid",
        lambda c: make_leaf(
            c["example.org"], [ID], not_before=NOW_DT + dt.timedelta(days=1), not_after=NOW_DT + dt.timedelta(days=2)
        ),
    ),
    ("svid_leaf_is_ca", lambda c: make_leaf(c["example.org"], [ID], ca_flag=True)),
    ("svid_bad_key_usage", lambda c: make_leaf(c["example.org"], [ID], usage=key_usage(cert_sign=True))),
    ("svid_bad_key_usage", lambda c: make_leaf(c["example.org"], [ID], usage=key_usage(crl_sign=True))),
    ("svid_bad_key_usage", lambda c: make_leaf(c["example.org"], [ID], usage=key_usage(digital_signature=False))),
    ("svid_multiple_uri_sans", lambda c: make_leaf(c["example.org"], [ID, "spiffe://example.org/other"])),
    ("svid_no_uri_san", lambda c: make_leaf(c["example.org"], [], dns=["caller.example.org"])),
    ("svid_no_uri_san", lambda c: make_leaf(c["example.org"], [])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["spiffe://example.org"])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["spiffe://EXAMPLE.org/ns/a"])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["spiffe://example.org/ns/%61"])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["spiffe://example.org/ns/../a"])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["https://example.org/ns/a"])),
    ("svid_invalid_spiffe_id", lambda c: make_leaf(c["example.org"], ["spiffe://example.org/" + "a" * 2100])),
    ("svid_unknown_trust_domain", lambda c: make_leaf(c["example.org"], ["spiffe://stranger.example/ns/a"])),
]


@pytest.mark.parametrize(("detail", "build"), CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_svids_are_rejected_with_a_reason(
    cas: dict[str, DevCA], verifier: X509SvidVerifier, detail: str, build: object
) -> None:
    cert, _ = build(cas)  # type: ignore[operator]
    with pytest.raises(IdentityError) as info:
        verifier.verify(url_pem(cert), now=time.time())
    assert info.value.detail == detail


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not a certificate",
        urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        "%ff%fe%00-----BEGIN CERTIFICATE-----",
        "%zz%",
        "A" * 70_000,
        "\udcff\udcfe",
    ],
)
def test_garbage_certificates(verifier: X509SvidVerifier, garbage: str) -> None:
    with pytest.raises(IdentityError) as info:
        verifier.verify(garbage, now=time.time())
    assert info.value.detail == "svid_malformed"


def test_truncated_pem(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    cert, _ = make_leaf(cas["example.org"], [ID])
    pem = cert.public_bytes(PEM).decode()
    with pytest.raises(IdentityError, match="svid_malformed"):
        verifier.verify(urllib.parse.quote(pem[: len(pem) // 2]), now=time.time())


def test_results_are_cached_until_expiry(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    now = time.time()
    cert, _ = make_leaf(cas["example.org"], [ID], not_after=dt.datetime.fromtimestamp(now + 30, dt.UTC))
    encoded = url_pem(cert)
    verifier.verify(encoded, now=now)
    verifier.verify(encoded, now=now + 1)
    assert (verifier.misses, verifier.hits) == (1, 1)
    with pytest.raises(IdentityError, match="svid_expired"):
        verifier.verify(encoded, now=now + 31)


def test_new_bundles_mean_a_new_cache(cas: dict[str, DevCA]) -> None:
    cert, _ = make_leaf(cas["example.org"], [ID])
    first = X509SvidVerifier(TrustBundles({"example.org": (cas["example.org"].ca_cert,)}))
    first.verify(url_pem(cert), now=time.time())
    rotated = X509SvidVerifier(TrustBundles({"example.org": (DevCA.create("example.org").ca_cert,)}))
    with pytest.raises(IdentityError, match="svid_chain_invalid"):
        rotated.verify(url_pem(cert), now=time.time())


def _intermediate(root: DevCA, not_after: dt.datetime | None = None) -> DevCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(not_after or dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(digital_signature=False, cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.ca_key.public_key()), critical=False)
        .sign(root.ca_key, hashes.SHA256())
    )
    return DevCA(root.trust_domain, key, cert, root.jwt_key)


def test_chain_through_an_intermediate_from_xfcc(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    middle = _intermediate(cas["example.org"])
    leaf, _ = make_leaf(middle, [ID])
    chain = urllib.parse.quote((leaf.public_bytes(PEM) + middle.ca_cert.public_bytes(PEM)).decode(), safe="")
    with pytest.raises(IdentityError, match="svid_chain_invalid"):
        verifier.verify(url_pem(leaf), now=time.time())
    xfcc = f'By=spiffe://example.org/ns/me;Hash=abc;Chain="{chain}";URI={ID}'
    assert verifier.verify(url_pem(leaf), chain_from_xfcc(xfcc), now=time.time()).spiffe_id == ID


def test_intermediate_from_another_trust_domain_does_not_help(
    cas: dict[str, DevCA], verifier: X509SvidVerifier
) -> None:
    middle = _intermediate(cas["partner.example"])
    leaf, _ = make_leaf(middle, [ID])  # claims example.org, chains to partner.example
    chain = urllib.parse.quote((leaf.public_bytes(PEM) + middle.ca_cert.public_bytes(PEM)).decode(), safe="")
    with pytest.raises(IdentityError, match="svid_chain_invalid"):
        verifier.verify(url_pem(leaf), chain, now=time.time())


def test_xfcc_chain_parsing() -> None:
    assert chain_from_xfcc('Hash=1;Chain="abc%22";URI=spiffe://x/y') == "abc%22"
    assert chain_from_xfcc("Hash=1;URI=spiffe://x/y") == ""
    assert chain_from_xfcc("") == ""


def _chain(leaf: x509.Certificate, middle: DevCA) -> str:
    return urllib.parse.quote((leaf.public_bytes(PEM) + middle.ca_cert.public_bytes(PEM)).decode(), safe="")


def test_a_cached_chain_expires_with_its_intermediate(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    now = time.time()
    middle = _intermediate(cas["example.org"], not_after=dt.datetime.fromtimestamp(now + 30, dt.UTC))
    leaf, _ = make_leaf(middle, [ID])  # valid for longer than its intermediate
    chain = _chain(leaf, middle)
    verifier.verify(url_pem(leaf), chain, now=now)
    verifier.verify(url_pem(leaf), chain, now=now + 29)
    assert (verifier.misses, verifier.hits) == (1, 1)
    with pytest.raises(IdentityError, match="svid_chain_invalid"):
        verifier.verify(url_pem(leaf), chain, now=now + 31)


def test_the_cache_key_is_the_certificate_and_its_chain(cas: dict[str, DevCA], verifier: X509SvidVerifier) -> None:
    middle = _intermediate(cas["example.org"])
    leaf, _ = make_leaf(middle, [ID])
    assert verifier.verify(url_pem(leaf), _chain(leaf, middle), now=time.time()).spiffe_id == ID
    with pytest.raises(IdentityError, match="svid_chain_invalid"):  # the same leaf without its chain
        verifier.verify(url_pem(leaf), now=time.time())
    stranger = _intermediate(DevCA.create("example.org"))
    with pytest.raises(IdentityError, match="svid_chain_invalid"):  # nor with a chain to another CA
        verifier.verify(url_pem(leaf), _chain(leaf, stranger), now=time.time())


def test_the_cache_is_bounded(cas: dict[str, DevCA]) -> None:
    bounded = X509SvidVerifier(TrustBundles({"example.org": (cas["example.org"].ca_cert,)}), max_entries=2)
    leaves = [url_pem(make_leaf(cas["example.org"], [f"{ID}/{i}"])[0]) for i in range(3)]
    for encoded in leaves:
        bounded.verify(encoded, now=time.time())
    bounded.verify(leaves[0], now=time.time())  # the oldest was evicted: verified again
    assert (bounded.misses, bounded.hits) == (4, 0)
    bounded.verify(leaves[2], now=time.time())
    assert bounded.hits == 1
