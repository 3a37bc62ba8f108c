"""go-spiffe ``v2/bundle/jwtbundle``, ``v2/bundle/spiffebundle`` and ``v2/bundle/x509bundle`` tests.

``Parse`` cases run against the parsers (:func:`~sidecar.identity.bundles.parse_bundle_document`,
:func:`~sidecar.identity.bundles.parse_x509_bundle_pem`, ``..._der`` for ``ParseRaw``); ``Load``
cases against the ``identity.files`` loader the runtime uses (a JWT bundle file in
``jwt_bundles``, an X.509 bundle file in ``bundles``), next to a valid local SVID. The
``Get*BundleForTrustDomain`` cases become what they protect: an SVID of a trust domain verifies
with that domain's bundle only. Bundle ``New``/CRUD/``Equal``/``Clone``/``Marshal``/``Read`` cases
and set mutation are Go API details (docs/identity-conformance.md).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import BundleDetail, SvidDetail
from sidecar.identity.bundles import (
    BundleDocument,
    TrustBundles,
    parse_bundle_document,
    parse_x509_bundle_der,
    parse_x509_bundle_pem,
)
from sidecar.identity.jwtsvid import JwtSvidVerifier
from sidecar.identity.state import IdentityLoadError
from sidecar.identity.x509svid import X509SvidVerifier
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, go, load_files

OWN = "example.org"  # the local SVID's trust domain in the Load cases

# The cases where we differ from the upstream, and why: tests.support.conformance.DIFFERENT


@dataclass
class Own:
    """A valid local identity to load next to the bundle under test."""

    root: fx.Authority
    svid: bytes
    key: bytes


@pytest.fixture(scope="module")
def own() -> Own:
    root = fx.make_ca(OWN)
    cert, key = fx.make_leaf(root, [f"spiffe://{OWN}/workload"])
    return Own(root, fx.pem(cert), fx.key_pem(key))


def _layout(tmp_path: Path, own: Own) -> None:
    fx.write(tmp_path / "svid.pem", own.svid)
    fx.write(tmp_path / "svid.key", own.key)
    fx.write(tmp_path / "own.pem", own.root.pem)


# -- jwtbundle ---------------------------------------------------------------------------------------
def _jwks(name: str) -> bytes | None:
    """go-spiffe's jwtbundle testdata, regenerated (``None``: the file does not exist)."""
    if name == "valid 1":
        return fx.document([fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD")])
    if name == "valid 2":
        return fx.document(
            [
                fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD"),
                fx.public_jwk(fx.new_key("ec-p256"), kid="gHTCunJbefYtnZnTctd84xeRWyMrEsWD"),
            ]
        )
    if name == "missing kid":
        return fx.document(
            [
                fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD"),
                fx.public_jwk(fx.new_key("ec-p256")),
            ]
        )
    return None


JWT_FILES = [
    ("testdata/jwks_valid_1.json", "valid 1", None, 1),
    ("testdata/jwks_valid_2.json", "valid 2", None, 2),
    ("testdata/does-not-exist.json", "non existent file", "missing", 0),
    ("testdata/jwks_missing_kid.json", "missing kid", BundleDetail.BUNDLE_MISSING_KID, 0),
]


@pytest.mark.parametrize(
    ("name", "detail", "count"),
    [pytest.param(n, d, c, id=go("jwtbundle", "TestParse", path)) for path, n, d, c in JWT_FILES],
)
def test_jwtbundle_parse(name: str, detail: str | None, count: int) -> None:
    data = _jwks(name)
    detail = BundleDetail.BUNDLE_MALFORMED if detail == "missing" else detail  # Parse gets no bytes at all
    document = expect(lambda: parse_bundle_document(data or b""), detail)
    if detail is None:
        assert document is not None and len(document.jwt_authorities) == count and not document.x509_authorities


@pytest.mark.parametrize(
    ("name", "detail", "count"),
    [pytest.param(n, d, c, id=go("jwtbundle", "TestLoad", path)) for path, n, d, c in JWT_FILES],
)
def test_jwtbundle_load(tmp_path: Path, own: Own, name: str, detail: str | None, count: int) -> None:
    _layout(tmp_path, own)
    data = _jwks(name)
    if data is not None:
        fx.write(tmp_path / "jwks.json", data)
    detail = SvidDetail.IDENTITY_FILE_UNREADABLE if detail == "missing" else detail

    def run() -> Any:
        return load_files(tmp_path, bundles={OWN: "own.pem"}, jwt_bundles={OWN: "jwks.json"})

    if detail is None:
        assert len(run().bundles.jwt[OWN]) == count
        return
    with pytest.raises(IdentityLoadError) as info:
        run()
    assert info.value.detail == detail and info.value.field == f"identity.files.jwt_bundles.{OWN}"


# -- spiffebundle --------------------------------------------------------------------------------------
def _spiffe_bundle(name: str) -> bytes | None:
    """go-spiffe's spiffebundle testdata, regenerated."""
    ca = fx.make_ca("domain.test", key="ec-p384")
    jwt_keys = [fx.public_jwk(fx.new_key("ec-p256"), use="jwt-svid", kid=f"kid-{i}") for i in range(6)]
    hints = {"spiffe_refresh_hint": 60, "spiffe_sequence": 1}
    if name == "valid_1":
        return fx.document([fx.x509_jwk(ca.cert), jwt_keys[0]])
    if name == "valid_2":
        return fx.document([fx.x509_jwk(ca.cert), *jwt_keys], **hints)
    if name == "missing_kid":
        return fx.document([fx.x509_jwk(ca.cert), fx.public_jwk(fx.new_key("ec-p256"), use="jwt-svid")])
    if name == "no_keys":
        return fx.document(None, **hints)
    if name == "multiple_x509":
        return fx.document([fx.x509_jwk(ca.cert, ca.cert), jwt_keys[0]])
    if name == "valid_with_wit":
        wit = [fx.public_jwk(fx.new_key("ec-p256"), use="wit-svid", kid=f"wit-{i}") for i in range(2)]
        return fx.document([fx.x509_jwk(ca.cert), *jwt_keys[:2], *wit], **hints)
    return None


# (testdata file, expected sub-code, JWT authorities, X.509 authorities, refresh hint, sequence, ignored keys)
SPIFFE_FILES: list[tuple[str, str | None, int, int, int | None, int | None, int]] = [
    ("does-not-exist", "missing", 0, 0, None, None, 0),
    ("valid_1", None, 1, 1, None, None, 0),
    ("valid_2", None, 6, 1, 60, 1, 0),
    ("missing_kid", BundleDetail.BUNDLE_MISSING_KID, 0, 0, None, None, 0),
    ("no_keys", BundleDetail.BUNDLE_MISSING_KEYS, 0, 0, None, None, 0),
    ("multiple_x509", BundleDetail.BUNDLE_BAD_X509_ENTRY, 0, 0, None, None, 0),
    ("valid_with_wit", None, 2, 1, 60, 1, 2),  # the wit-svid keys are neither JWT nor X.509 authorities
]


def _spiffe_id(test: str, name: str) -> str:
    path = "testdata/does-not-exist.json" if name == "does-not-exist" else f"testdata/spiffebundle_{name}.json"
    return go("spiffebundle", test, path)


@pytest.mark.parametrize(
    ("name", "detail", "jwt_count", "x509_count", "hint", "sequence", "ignored"),
    [pytest.param(*case, id=_spiffe_id("TestParse", case[0])) for case in SPIFFE_FILES],
)
def test_spiffebundle_parse(
    name: str, detail: str | None, jwt_count: int, x509_count: int, hint: int | None, sequence: int | None, ignored: int
) -> None:
    data = _spiffe_bundle(name)
    detail = BundleDetail.BUNDLE_MALFORMED if detail == "missing" else detail
    document: BundleDocument | None = expect(lambda: parse_bundle_document(data or b""), detail)
    if detail is None:
        assert document is not None
        assert len(document.jwt_authorities) == jwt_count and len(document.x509_authorities) == x509_count
        assert (document.refresh_hint, document.sequence) == (hint, sequence)
        assert len(document.ignored) == ignored


@pytest.mark.parametrize(
    ("name", "detail", "jwt_count"),
    [pytest.param(case[0], case[1], case[2], id=_spiffe_id("TestLoad", case[0])) for case in SPIFFE_FILES],
)
def test_spiffebundle_load(tmp_path: Path, own: Own, name: str, detail: str | None, jwt_count: int) -> None:
    _layout(tmp_path, own)
    data = _spiffe_bundle(name)
    if data is not None:
        fx.write(tmp_path / "bundle.json", data)
    detail = SvidDetail.IDENTITY_FILE_UNREADABLE if detail == "missing" else detail
    state = expect(lambda: load_files(tmp_path, bundles={OWN: "own.pem"}, jwt_bundles={OWN: "bundle.json"}), detail)
    if detail is None:
        assert state is not None and len(state.bundles.jwt[OWN]) == jwt_count
        assert state.bundles.x509[OWN] == (own.root.cert,)  # X.509 trust comes from `bundles` (PEM) only


# -- x509bundle ----------------------------------------------------------------------------------------
def _certs(name: str) -> tuple[bytes, int]:
    """go-spiffe's x509bundle testdata (PEM), regenerated, with the number of certificates."""
    one, two = fx.make_ca("domain.test", name="PEMUTILTEST1"), fx.make_ca("domain.test", name="PEMUTILTEST2")
    if name == "certs.pem":
        return fx.pem(one.cert, two.cert), 2
    if name == "cert.pem":
        return fx.pem(one.cert), 1
    if name == "empty.pem":
        return b"", 0
    if name == "not-pem.pem":
        return b"not a PEM file\n", 0
    return fx.corrupt_pem(fx.pem(one.cert)), 0  # corrupted.pem


X509_PARSE = [
    ("Parse multiple certificates should succeed", "certs.pem", None),
    ("Parse single certificate should succeed", "cert.pem", None),
    ("Parse empty bytes should result in empty bundle", "empty.pem", BundleDetail.BUNDLE_EMPTY),  # DIFFERENT, above
    ("Parse non-PEM bytes should fail", "not-pem.pem", BundleDetail.BUNDLE_MALFORMED),
    ("Parse a corrupted certificate should fail", "corrupted.pem", BundleDetail.BUNDLE_MALFORMED),
]


@pytest.mark.parametrize(
    ("name", "detail"), [pytest.param(f, d, id=go("x509bundle", "TestParse", case)) for case, f, d in X509_PARSE]
)
def test_x509bundle_parse(name: str, detail: str | None) -> None:
    data, count = _certs(name)
    certs = expect(lambda: parse_x509_bundle_pem(data), detail)
    if detail is None:
        assert certs is not None and len(certs) == count


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("certs.pem", id=go("x509bundle", "TestParseRaw", "Parse multiple certificates should succeed")),
        pytest.param("cert.pem", id=go("x509bundle", "TestParseRaw", "Parse single certificate should succeed")),
        pytest.param(
            "empty.pem",
            id=go("x509bundle", "TestParseRaw", "Parse should not fail if no certificate block is is found"),
        ),
    ],
)
def test_x509bundle_parse_raw(name: str) -> None:
    """DER, as the Workload API sends bundles; no bytes is an empty bundle (the domain trusts nothing)."""
    data, count = _certs(name)
    raw = fx.der(*parse_x509_bundle_pem(data)) if count else b""
    assert len(parse_x509_bundle_der(raw)) == count


@pytest.mark.parametrize(
    ("exists", "detail"),
    [
        pytest.param(True, None, id=go("x509bundle", "TestLoad_Succeeds")),
        pytest.param(False, SvidDetail.IDENTITY_FILE_UNREADABLE, id=go("x509bundle", "TestLoad_Fails")),
    ],
)
def test_x509bundle_load(tmp_path: Path, own: Own, exists: bool, detail: str | None) -> None:
    _layout(tmp_path, own)
    if exists:
        fx.write(tmp_path / "certs.pem", _certs("certs.pem")[0])
    state = expect(lambda: load_files(tmp_path, bundles={OWN: "own.pem", "domain.test": "certs.pem"}), detail)
    if detail is None:
        assert state is not None and len(state.bundles.x509["domain.test"]) == 2


# -- Get*BundleForTrustDomain: a trust domain's SVIDs verify with its own bundle only ----------------
TD, TD2 = "domain.test", "domain2.test"


@dataclass
class Issuer:
    ca: fx.Authority
    jwt_key: Any


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer(fx.make_ca(TD), fx.new_key("ec-p256"))


def _x509_check(issuer: Issuer, trust_domain: str) -> Callable[[], Any]:
    """An X.509-SVID of ``trust_domain`` (signed by ``TD``'s CA) against bundles holding ``TD`` only."""
    leaf, _ = fx.make_leaf(issuer.ca, [f"spiffe://{trust_domain}/workload"])
    verifier = X509SvidVerifier(TrustBundles({TD: (issuer.ca.cert,)}))
    return lambda: verifier.verify(urllib.parse.quote(fx.pem(leaf).decode(), safe=""), now=time.time())


def _jwt_check(issuer: Issuer, trust_domain: str) -> Callable[[], Any]:
    """A JWT-SVID of ``trust_domain`` (signed by ``TD``'s key) against bundles holding ``TD`` only."""
    token = fx.jws(
        {"alg": "ES256", "kid": "key-1", "typ": "JWT"}, fx.claims(f"spiffe://{trust_domain}/workload"), issuer.jwt_key
    )
    verifier = JwtSvidVerifier(TrustBundles(jwt={TD: {"key-1": issuer.jwt_key.public_key()}}), ["audience"])
    return lambda: verifier.verify(token, now=time.time())


LOOKUPS = [
    # (upstream case, which authority, another trust domain?)
    (go("jwtbundle", "TestGetJWTBundleForTrustDomain", "same trust domain"), "jwt", False),
    (go("jwtbundle", "TestGetJWTBundleForTrustDomain", "other trust domain"), "jwt", True),
    (go("jwtbundle", "TestSetGetJWTBundleForTrustDomain", "present"), "jwt", False),
    (go("jwtbundle", "TestSetGetJWTBundleForTrustDomain", "absent"), "jwt", True),
    (go("spiffebundle", "TestGetBundleForTrustDomain", "same trust domain"), "both", False),
    (go("spiffebundle", "TestGetBundleForTrustDomain", "other trust domain"), "both", True),
    (go("spiffebundle", "TestGetX509BundleForTrustDomain", "same trust domain"), "x509", False),
    (go("spiffebundle", "TestGetX509BundleForTrustDomain", "other trust domain"), "x509", True),
    (go("spiffebundle", "TestGetJWTBundleForTrustDomain", "same trust domain"), "jwt", False),
    (go("spiffebundle", "TestGetJWTBundleForTrustDomain", "other trust domain"), "jwt", True),
    (go("spiffebundle", "TestSetGetBundleForTrustDomain", "present"), "both", False),
    (go("spiffebundle", "TestSetGetBundleForTrustDomain", "absent"), "both", True),
    (go("spiffebundle", "TestSetGetX509BundleForTrustDomain", "present"), "x509", False),
    (go("spiffebundle", "TestSetGetX509BundleForTrustDomain", "absent"), "x509", True),
    (go("spiffebundle", "TestSetGetJWTBundleForTrustDomain", "present"), "jwt", False),
    (go("spiffebundle", "TestSetGetJWTBundleForTrustDomain", "absent"), "jwt", True),
    (go("x509bundle", "TestGetX509BundleForTrustDomain_Succeeds"), "x509", False),
    (go("x509bundle", "TestGetX509BundleForTrustDomain_Fails"), "x509", True),
    (go("x509bundle", "TestSetGetX509BundleForTrustDomain", "present"), "x509", False),
    (go("x509bundle", "TestSetGetX509BundleForTrustDomain", "absent"), "x509", True),
]


@pytest.mark.parametrize(("kind", "other"), [pytest.param(k, o, id=case) for case, k, o in LOOKUPS])
def test_bundle_for_trust_domain(issuer: Issuer, kind: str, other: bool) -> None:
    trust_domain = TD2 if other else TD
    if kind in ("x509", "both"):
        expect(_x509_check(issuer, trust_domain), "svid_unknown_trust_domain" if other else None)
    if kind in ("jwt", "both"):
        expect(_jwt_check(issuer, trust_domain), "jwt_svid_unknown_trust_domain" if other else None)
