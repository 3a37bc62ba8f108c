"""go-spiffe ``v2/svid/x509svid``: ``svid_test.go`` (Load, Parse, ParseRaw) and ``verify_test.go`` (Verify).

go-spiffe's ``Parse``/``Load``/``ParseRaw`` build a workload's *own* SVID: here that is the local
identity (:mod:`sidecar.identity.local_svid`; PEM from ``identity.files``, DER from the Workload API).
``Verify`` checks a *peer's* chain: here :class:`~sidecar.identity.x509svid.X509SvidVerifier`.
Our local validation also verifies the chain to the SVID's own trust domain bundle, so every
"success" case gets that bundle; each "fails" case breaks exactly the rule the upstream case names.
Cases for Go API details (Marshal, GetX509SVID, a nil bundle source) are in docs/identity-conformance.md.
"""

from __future__ import annotations

import base64
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.errors import SvidDetail
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.local_svid import parse_svid_der, parse_svid_pem, validate_local_svid
from sidecar.identity.state import IdentityLoadError
from sidecar.identity.x509svid import X509SvidVerifier
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, go, load_files

TD = "example.org"
ID = f"spiffe://{TD}/workload-1"


@dataclass
class World:
    """The fixtures go-spiffe keeps in ``testdata/``, regenerated: a root, an intermediate, leaves."""

    root: fx.Authority
    intermediate: fx.Authority
    bundles: TrustBundles


@pytest.fixture(scope="module")
def world() -> World:
    root = fx.make_ca(TD, key="ec-p384")
    intermediate = fx.make_ca(TD, signer=root)
    return World(root, intermediate, TrustBundles({TD: (root.cert,)}))


def _files(world: World) -> dict[str, Callable[[], tuple[bytes, bytes]]]:
    """``testdata`` file pairs (certificates, key) by the upstream variable name."""
    root, inter = world.root, world.intermediate

    def leaf_only_rsa() -> tuple[bytes, bytes]:  # good-leaf-only.pem + key-pkcs8-rsa.pem
        cert, key = fx.make_leaf(root, [ID], key=fx.cached_key("rsa-2048"))
        return fx.pem(cert), fx.key_pem(key)

    def leaf_and_intermediate() -> tuple[bytes, bytes]:  # good-leaf-and-intermediate.pem + key-pkcs8-ecdsa.pem
        cert, key = fx.make_leaf(inter, [ID])
        return fx.pem(cert, inter.cert), fx.key_pem(key)

    def broken(**leaf: Any) -> Callable[[], tuple[bytes, bytes]]:
        def build() -> tuple[bytes, bytes]:
            cert, key = fx.make_leaf(root, leaf.pop("uris", [ID]), key=fx.cached_key("rsa-2048"), **leaf)
            return fx.pem(cert), fx.key_pem(key)

        return build

    def bad_signer(**ca: Any) -> Callable[[], tuple[bytes, bytes]]:
        def build() -> tuple[bytes, bytes]:
            signer = fx.make_ca(TD, signer=root, **ca)
            cert, key = fx.make_leaf(signer, [ID], key=fx.cached_key("rsa-2048"))
            return fx.pem(cert, signer.cert), fx.key_pem(key)

        return build

    return {
        "certSingle": leaf_only_rsa,
        "certMultiple": leaf_and_intermediate,
        "leafEmptyID": broken(uris=[]),
        "leafCAtrue": broken(ca=True),
        "leafNoDigitalSignature": broken(usage=fx.key_usage(key_encipherment=True)),
        "leafCertSign": broken(usage=fx.key_usage(digital_signature=True, key_cert_sign=True)),
        "leafCRLSign": broken(usage=fx.key_usage(digital_signature=True, crl_sign=True)),
        "signNoCA": bad_signer(ca=False),
        "signNoKeyCertSign": bad_signer(usage=fx.key_usage(crl_sign=True)),
    }


def _parse(world: World, certs: bytes, key: bytes) -> Any:
    chain, private = parse_svid_pem(certs, key)
    return validate_local_svid(chain, private, world.bundles, now=time.time())


def _rsa_key_pem() -> bytes:
    return fx.key_pem(fx.cached_key("rsa-2048"))


# TestParse: (name, build certificates bytes, build key bytes, expected sub-code, expected chain length)
PARSE_CASES: list[tuple[str, str, str, str | None, int]] = [
    ("Single certificate and key", "certSingle", "certSingle.key", None, 1),
    ("Certificate with intermediate and key", "certMultiple", "certMultiple.key", None, 2),
    ("Key and certificate in the same byte array", "keyAndCert", "keyAndCert", None, 1),
    ("Certificate and Key in the same byte array", "certAndKey", "certAndKey", None, 1),
    ("Missing certificate", "keyRSA", "keyRSA", "svid_malformed", 0),
    ("Missing private key", "certSingle", "certSingle", SvidDetail.SVID_BAD_PRIVATE_KEY, 0),
    ("Private key not PEM", "certSingle", "notPEM", SvidDetail.SVID_BAD_PRIVATE_KEY, 0),
    ("Certificate not PEM", "notPEM", "keyRSA", "svid_malformed", 0),
    ("Corrupt private key", "certSingle", "corruptKey", SvidDetail.SVID_BAD_PRIVATE_KEY, 0),
    ("Corrupt certificate", "corruptCert", "keyRSA", "svid_malformed", 0),
    ("Certificate does not match private key", "certMultiple", "keyRSA", SvidDetail.SVID_KEY_MISMATCH, 0),
    ("Certificate without SPIFFE ID", "leafEmptyID", "leafEmptyID.key", "svid_no_uri_san", 0),
    ("Leaf certificate with CA flag set to true", "leafCAtrue", "leafCAtrue.key", "svid_leaf_is_ca", 0),
    (
        "Leaf certificate without digitalSignature as key usage",
        "leafNoDigitalSignature",
        "leafNoDigitalSignature.key",
        "svid_bad_key_usage",
        0,
    ),
    ("Leaf certificate with certSign as key usage", "leafCertSign", "leafCertSign.key", "svid_bad_key_usage", 0),
    ("Leaf certificate with cRLSign as key usage", "leafCRLSign", "leafCRLSign.key", "svid_bad_key_usage", 0),
    ("Signing certificate without CA flag", "signNoCA", "signNoCA.key", SvidDetail.SVID_SIGNER_NOT_CA, 0),
    (
        "Signing certificate without 'keyCertSign' usage",
        "signNoKeyCertSign",
        "signNoKeyCertSign.key",
        SvidDetail.SVID_SIGNER_BAD_KEY_USAGE,
        0,
    ),
]


def _material(world: World) -> dict[str, bytes]:
    """Every byte string the TestParse table names (``X.key``: the key generated with ``X``)."""
    out: dict[str, bytes] = {}
    for name, build in _files(world).items():
        out[name], out[f"{name}.key"] = build()
    single, single_key = out["certSingle"], out["certSingle.key"]
    out["keyRSA"] = _rsa_key_pem()
    out["keyAndCert"] = single_key + single
    out["certAndKey"] = single + single_key
    out["notPEM"] = b"not a PEM file\n"
    out["corruptKey"] = fx.corrupt_pem(single_key)
    out["corruptCert"] = fx.corrupt_pem(single)
    return out


@pytest.mark.parametrize(
    ("certs", "key", "detail", "length"),
    [pytest.param(c, k, d, n, id=go("x509svid", "TestParse", name)) for name, c, k, d, n in PARSE_CASES],
)
def test_parse(world: World, certs: str, key: str, detail: str | None, length: int) -> None:
    material = _material(world)
    svid = expect(lambda: _parse(world, material[certs], material[key]), detail)
    if detail is None:
        assert svid is not None and svid.spiffe_id == ID and len(svid.chain) == length
        assert svid.chain[0].public_key() == svid.private_key.public_key()


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        pytest.param("succeeds", None, id=go("x509svid", "TestLoad_Succeeds")),
        pytest.param(
            "no-cert", SvidDetail.IDENTITY_FILE_UNREADABLE, id=go("x509svid", "TestLoad_FailsCannotReadCertFile")
        ),
        pytest.param(
            "no-key", SvidDetail.IDENTITY_FILE_UNREADABLE, id=go("x509svid", "TestLoad_FailsCannotReadKeyFile")
        ),
    ],
)
def test_load(world: World, tmp_path: Path, case: str, detail: str | None) -> None:
    certs, key = _files(world)["certSingle"]()
    fx.write(tmp_path / "bundle.pem", world.root.pem)
    if case != "no-cert":
        fx.write(tmp_path / "svid.pem", certs)
    if case != "no-key":
        fx.write(tmp_path / "svid.key", key)
    if detail is None:
        assert load_files(tmp_path, bundles={TD: "bundle.pem"}).svid.spiffe_id == ID
        return
    with pytest.raises(IdentityLoadError) as info:
        load_files(tmp_path, bundles={TD: "bundle.pem"})
    assert info.value.detail == detail
    assert info.value.field == ("identity.files.svid" if case == "no-cert" else "identity.files.key")


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        pytest.param("single", None, id=go("x509svid", "TestParseRaw", "Single certificate and key")),
        pytest.param("multiple", None, id=go("x509svid", "TestParseRaw", "Multiple certificates and key")),
        pytest.param(
            "bad-certs", "svid_malformed", id=go("x509svid", "TestParseRaw", "Certificate bytes are not DER encoded")
        ),
        pytest.param(
            "bad-key",
            SvidDetail.SVID_BAD_PRIVATE_KEY,
            id=go("x509svid", "TestParseRaw", "Key bytes are not DER encoded"),
        ),
    ],
)
def test_parse_raw(world: World, case: str, detail: str | None) -> None:
    """The Workload API's encoding: concatenated DER certificates and a PKCS#8 DER key."""
    if case == "multiple":
        cert, key = fx.make_leaf(world.intermediate, [ID])
        chain_der, key_der = fx.der(cert, world.intermediate.cert), fx.key_der(key)
    else:
        cert, key = fx.make_leaf(world.root, [ID], key=fx.cached_key("rsa-2048"))
        chain_der, key_der = fx.der(cert), fx.key_der(key)
    if case == "bad-certs":
        chain_der = b"not-DER-encoded"
    if case == "bad-key":
        key_der = b"not-DER-encoded"

    def run() -> Any:
        chain, private = parse_svid_der(chain_der, key_der)
        return validate_local_svid(chain, private, world.bundles, now=time.time())

    svid = expect(run, detail)
    if detail is None:
        assert svid is not None and len(svid.chain) == (2 if case == "multiple" else 1)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(False, id=go("x509svid", "TestParseRejectsLeafWithRootPathSPIFFEID")),
        pytest.param(True, id=go("x509svid", "TestParseRawRejectsLeafWithRootPathSPIFFEID")),
    ],
)
def test_leaf_with_root_path_spiffe_id(world: World, raw: bool) -> None:
    cert, key = fx.make_leaf(world.root, [f"spiffe://{TD}"], self_signed=True)

    def run() -> Any:
        chain, private = (
            parse_svid_der(fx.der(cert), fx.key_der(key)) if raw else parse_svid_pem(fx.pem(cert), fx.key_pem(key))
        )
        return validate_local_svid(chain, private, world.bundles, now=time.time())

    expect(run, "svid_invalid_spiffe_id")


# -- verify_test.go ----------------------------------------------------------------------------------
TD1, TD2 = "domain1.test", "domain2.test"


@dataclass
class Domains:
    ca1: fx.Authority
    ca2: fx.Authority


@pytest.fixture(scope="module")
def domains() -> Domains:
    return Domains(fx.make_ca(TD1), fx.make_ca(TD2))


def _url(cert: x509.Certificate) -> str:
    return urllib.parse.quote(fx.pem(cert).decode(), safe="")


WORKLOAD = f"spiffe://{TD1}/workload"
VERIFY_CASES: list[tuple[str, str, str | None]] = [
    # (case, how the chain / bundles are built, expected sub-code)
    ("empty chain", "empty-chain", "svid_malformed"),
    ("empty bundle", "empty-bundle", "svid_unknown_trust_domain"),
    ("no roots", "no-roots", "svid_chain_invalid"),
    ("no roots for leaf cert domain", "bundle2", "svid_unknown_trust_domain"),
    ("bad leaf cert id", "sparfe", "svid_invalid_spiffe_id"),
    ("verification fails", "td1-with-ca2-roots", "svid_chain_invalid"),
    ("no URI SAN", "no-uri", "svid_no_uri_san"),
    ("more than one URI SAN", "dup-uris", "svid_multiple_uri_sans"),
    ("leaf is CA", "is-ca", "svid_leaf_is_ca"),
    ("leaf has KeyUsageCertSign", "cert-sign", "svid_bad_key_usage"),
    ("leaf has KeyUsageCRLSign", "crl-sign", "svid_bad_key_usage"),
    ("with time", "after-expiry", "svid_expired"),
    ("success", "good", None),
]


@pytest.mark.parametrize(
    ("case", "detail"), [pytest.param(c, d, id=go("x509svid", "TestVerify", name)) for name, c, d in VERIFY_CASES]
)
def test_verify(domains: Domains, case: str, detail: str | None) -> None:
    ca1, ca2 = domains.ca1, domains.ca2
    bundles = TrustBundles({TD1: (ca1.cert,)})
    now = time.time()
    leaf_args: dict[str, Any] = {}
    uris = [WORKLOAD]
    if case == "empty-bundle":
        bundles = TrustBundles()
    elif case == "no-roots":
        bundles = TrustBundles({TD1: ()})
    elif case == "bundle2":
        bundles = TrustBundles({TD2: (ca2.cert,)})
    elif case == "td1-with-ca2-roots":
        bundles = TrustBundles({TD1: (ca2.cert,)})
    elif case == "sparfe":
        uris = [f"sparfe://{TD1}/workload"]
    elif case == "no-uri":
        uris = []
    elif case == "dup-uris":
        uris = [WORKLOAD, WORKLOAD]
    elif case == "is-ca":
        leaf_args["ca"] = True
    elif case == "cert-sign":
        leaf_args["usage"] = fx.key_usage(digital_signature=True, key_cert_sign=True)
    elif case == "crl-sign":
        leaf_args["usage"] = fx.key_usage(digital_signature=True, crl_sign=True)
    leaf, _ = fx.make_leaf(ca1, uris, **leaf_args)
    if case == "after-expiry":
        now = leaf.not_valid_after_utc.timestamp() + 1
    verifier = X509SvidVerifier(bundles)
    verified = expect(lambda: verifier.verify("" if case == "empty-chain" else _url(leaf), now=now), detail)
    if detail is None:
        assert verified is not None and verified.spiffe_id == WORKLOAD


@pytest.mark.parametrize(
    ("corrupt", "detail"),
    [
        pytest.param(False, None, id=go("x509svid", "TestParseAndVerify", "raw leaf verifies")),
        pytest.param(True, "svid_malformed", id=go("x509svid", "TestParseAndVerify", "modified byte does not parse")),
    ],
)
def test_parse_and_verify(domains: Domains, corrupt: bool, detail: str | None) -> None:
    leaf, _ = fx.make_leaf(domains.ca1, [WORKLOAD])
    raw = bytearray(fx.der(leaf))
    if corrupt:
        raw[0] = 0x27  # the upstream's edit: the outer SEQUENCE tag is gone
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(raw)) + b"-----END CERTIFICATE-----\n"
    verifier = X509SvidVerifier(TrustBundles({TD1: (domains.ca1.cert,)}))
    expect(lambda: verifier.verify(urllib.parse.quote(pem.decode(), safe=""), now=time.time()), detail)
