"""py-spiffe ``spiffe/tests/unit/bundle``: ``x509bundle/test_x509_bundle.py``, ``test_x509_bundle_set.py``,
``jwt_bundle/test_jwt_bundle.py`` and ``test_jwt_bundle_set.py``.

Parsing cases run against our parsers, ``load`` cases against the ``identity.files`` loader, and the
lookup cases (``get_jwt_authority``, ``get_bundle_for_trust_domain``) against what the lookup is for:
verifying an SVID. Mutation (``put``, ``add_authority``), ``save`` and equality cases are API details
(docs/identity-conformance.md).
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
from cryptography.x509.oid import NameOID

from sidecar.config.schema import IdentityFilesSpec
from sidecar.errors import BundleDetail, SvidDetail
from sidecar.identity.bundles import TrustBundles, parse_bundle_document, parse_x509_bundle_der, parse_x509_bundle_pem
from sidecar.identity.jwtsvid import JwtSvidVerifier
from sidecar.identity.state import IdentityLoadError
from sidecar.identity.x509svid import X509SvidVerifier
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, load_files, py

XB, XS, JB, JS = (
    "x509bundle/test_x509_bundle",
    "x509bundle/test_x509_bundle_set",
    "jwt_bundle/test_jwt_bundle",
    "jwt_bundle/test_jwt_bundle_set",
)
TD = "domain.test"
OWN = "example.org"

# The cases where we differ from the upstream, and why: tests.support.conformance.DIFFERENT


@pytest.fixture(scope="module")
def pemutil() -> tuple[fx.Authority, fx.Authority]:
    """``cert.pem`` / ``certs.pem``: CA certificates with subjects CN=PEMUTILTEST1 and CN=PEMUTILTEST2."""
    return fx.make_ca(TD, name="PEMUTILTEST1"), fx.make_ca(TD, name="PEMUTILTEST2")


def _common_names(certs: Any) -> set[str]:
    return {str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value) for c in certs}


@pytest.mark.parametrize(
    ("raw", "count"),
    [
        pytest.param(True, 1, id=py(XB, "test_parse_raw_bundle_single_authority")),
        pytest.param(True, 2, id=py(XB, "test_parse_raw_bundle_multiple_authorities")),
        pytest.param(False, 1, id=py(XB, "test_parse_bundle_single_authority")),
        pytest.param(False, 2, id=py(XB, "test_parse_bundle_multiple_authorities")),
    ],
)
def test_x509_bundle_parse(pemutil: tuple[fx.Authority, fx.Authority], raw: bool, count: int) -> None:
    certs = [a.cert for a in pemutil[:count]]
    parsed = parse_x509_bundle_der(fx.der(*certs)) if raw else parse_x509_bundle_pem(fx.pem(*certs))
    assert _common_names(parsed) == {f"PEMUTILTEST{i + 1}" for i in range(count)}


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        pytest.param(b"", BundleDetail.BUNDLE_EMPTY, id=py(XB, "test_parse_bundle_from_empty")),
        pytest.param(b"not a PEM file\n", BundleDetail.BUNDLE_MALFORMED, id=py(XB, "test_parse_bundle_from_not_pem")),
    ],
)
def test_x509_bundle_parse_fails(data: bytes, detail: str) -> None:
    expect(lambda: parse_x509_bundle_pem(data), detail)


@dataclass
class Own:
    root: fx.Authority
    svid: bytes
    key: bytes


@pytest.fixture(scope="module")
def own() -> Own:
    root = fx.make_ca(OWN)
    cert, key = fx.make_leaf(root, [f"spiffe://{OWN}/workload"])
    return Own(root, fx.pem(cert), fx.key_pem(key))


@pytest.mark.parametrize(
    "exists",
    [
        pytest.param(True, id=py(XB, "test_load_bundle")),
        pytest.param(False, id=py(XB, "test_load_bundle_non_existent_file")),
    ],
)
def test_x509_bundle_load(tmp_path: Path, own: Own, pemutil: tuple[fx.Authority, fx.Authority], exists: bool) -> None:
    fx.write(tmp_path / "svid.pem", own.svid)
    fx.write(tmp_path / "svid.key", own.key)
    fx.write(tmp_path / "own.pem", own.root.pem)
    if exists:
        fx.write(tmp_path / "certs.pem", fx.pem(pemutil[0].cert, pemutil[1].cert))
        state = load_files(tmp_path, bundles={OWN: "own.pem", TD: "certs.pem"})
        assert _common_names(state.bundles.x509[TD]) == {"PEMUTILTEST1", "PEMUTILTEST2"}
        return
    with pytest.raises(IdentityLoadError) as info:
        load_files(tmp_path, bundles={OWN: "own.pem", TD: "certs.pem"})
    assert (info.value.detail, info.value.field) == (
        SvidDetail.IDENTITY_FILE_UNREADABLE,
        f"identity.files.bundles.{TD}",
    )


# -- bundle sets: lookups by trust domain ------------------------------------------------------------
TD1, TD2 = "domain.test", "example.org"


@pytest.fixture(scope="module")
def two_domains() -> dict[str, fx.Authority]:
    return {TD1: fx.make_ca(TD1), TD2: fx.make_ca(TD2)}


def _x509(cas: dict[str, fx.Authority], bundles: TrustBundles, trust_domain: str) -> Any:
    leaf, _ = fx.make_leaf(cas.get(trust_domain) or fx.make_ca(trust_domain), [f"spiffe://{trust_domain}/w"])
    return X509SvidVerifier(bundles).verify(urllib.parse.quote(fx.pem(leaf).decode(), safe=""), now=time.time())


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("dict", id=py(XS, "test_create_new_x509_bundle_set")),
        pytest.param("list", id=py(XS, "test_create_x509_bundle_set_from_list_of_bundles")),
    ],
)
def test_x509_bundle_set_lookup(two_domains: dict[str, fx.Authority], case: str) -> None:
    """Each trust domain's SVIDs verify with its own bundle; a third domain has none."""
    bundles = TrustBundles({td: (ca.cert,) for td, ca in two_domains.items()})
    for trust_domain in (TD1, TD2):
        assert _x509(two_domains, bundles, trust_domain).trust_domain == trust_domain
    expect(lambda: _x509(two_domains, bundles, "other.test"), "svid_unknown_trust_domain")


# -- jwt_bundle ----------------------------------------------------------------------------------------
EC = fx.cached_key("ec-p384")
RSA = fx.cached_key("rsa-2048")
ANY = "any.domain"


def _jwt(kid: str, key: Any = RSA, alg: str = "RS256", trust_domain: str = ANY) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    return fx.jws(header, fx.claims(f"spiffe://{trust_domain}/w"), key)


def _verify(authorities: dict[str, Any], token: str, trust_domains: tuple[str, ...] = (ANY,)) -> Any:
    bundles = TrustBundles(jwt={td: authorities for td in trust_domains})
    return JwtSvidVerifier(bundles, ["audience"]).verify(token, now=time.time())


AUTHORITIES = {"kid1": EC.public_key(), "kid2": RSA.public_key()}

LOOKUPS = [
    # (py-spiffe test, the bundle's authorities, the token's kid, sub-code)
    ("test_get_jwt_authority_valid_input", AUTHORITIES, "kid2", None),
    ("test_get_jwt_authority_invalid_key_id_not_found", AUTHORITIES, "p0", "jwt_svid_unknown_key"),
    ("test_get_jwt_authority_invalid_input", AUTHORITIES, "", "jwt_svid_bad_header"),
    ("test_get_jwt_authority_empty_authority_dict", {}, "p1", "jwt_svid_unknown_key"),
    ("test_create_jwt_bundle_no_authorities", {}, "kid2", "jwt_svid_unknown_key"),  # an empty bundle trusts nothing
]


@pytest.mark.parametrize(("authorities", "kid", "detail"), [pytest.param(*c[1:], id=py(JB, c[0])) for c in LOOKUPS])
def test_jwt_authority_lookup(authorities: dict[str, Any], kid: str, detail: str | None) -> None:
    expect(lambda: _verify(authorities, _jwt(kid)), detail)


def _jwks_1_ec_key() -> bytes:
    return fx.document([fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD")])


def _jwks_3_keys() -> bytes:
    return fx.document(
        [
            fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD"),
            fx.public_jwk(fx.new_key("ec-p256"), kid="gHTCunJbefYtnZnTctd84xeRWyMrEsWD"),
            fx.public_jwk(RSA, kid="2011-04-29"),
        ]
    )


def _jwks_missing_x() -> bytes:
    jwk = fx.public_jwk(fx.new_key("ec-p256"), kid="C6vs25welZOx6WksNYfbMfiw9l96pMnD")
    del jwk["x"]
    return fx.document([jwk])


def _jwks_missing_kid() -> bytes:
    return fx.document([fx.public_jwk(fx.new_key("ec-p256"), kid="k1"), fx.public_jwk(fx.new_key("ec-p256"))])


PARSES = [
    ("test_parse", 0, _jwks_1_ec_key, None, 1),
    ("test_parse", 1, _jwks_3_keys, None, 3),
    ("test_parse_missing_bundle_bytes", None, lambda: b"", BundleDetail.BUNDLE_MALFORMED, 0),
    ("test_parse_invalid_bytes", 0, lambda: b"1211", BundleDetail.BUNDLE_MALFORMED, 0),
    ("test_parse_invalid_bytes", 1, lambda: b"invalid bytes", BundleDetail.BUNDLE_MALFORMED, 0),
    ("test_parse_bundle_bytes_invalid_key", None, _jwks_missing_x, BundleDetail.BUNDLE_BAD_KEY, 0),
    ("test_parse_corrupted_key_missing_key_id", None, _jwks_missing_kid, BundleDetail.BUNDLE_MISSING_KID, 0),
    ("test_parse_jwks_with_empty_keys_array", None, lambda: b'{"keys": []}', None, 0),
    (
        "test_parse_jwks_with_null_keys_field",
        None,
        lambda: b'{"keys": null}',
        BundleDetail.BUNDLE_MISSING_KEYS,
        0,
    ),  # DIFFERENT
]


@pytest.mark.parametrize(
    ("build", "detail", "count"), [pytest.param(c[2], c[3], c[4], id=py(JB, c[0], c[1])) for c in PARSES]
)
def test_jwt_bundle_parse(build: Any, detail: str | None, count: int) -> None:
    document = expect(lambda: parse_bundle_document(build()), detail)
    if detail is None:
        assert document is not None and len(document.jwt_authorities) == count


@pytest.mark.parametrize("_", [pytest.param(0, id=py(JB, "test_parse_invalid_trust_domain"))])
def test_jwt_bundle_needs_a_trust_domain_name(tmp_path: Path, _: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not a trust domain name"):
        IdentityFilesSpec(
            svid=tmp_path / "s", key=tmp_path / "k", bundles={OWN: tmp_path / "b"}, jwt_bundles={"": tmp_path / "j"}
        )


# -- jwt_bundle_set -------------------------------------------------------------------------------------
SET_LOOKUPS = [
    ("test_create_jwt_bundle_set", (TD1, TD2), TD2, None),
    ("test_create_jwt_bundle_set_no_bundle", (), TD1, "jwt_svid_unknown_trust_domain"),
    ("test_get", (TD1,), TD1, None),
    ("test_get_non_existing_trust_domain", (TD1,), TD2, "jwt_svid_unknown_trust_domain"),
    ("test_get_empty_set", (), TD1, "jwt_svid_unknown_trust_domain"),
]


@pytest.mark.parametrize(
    ("domains", "subject_domain", "detail"), [pytest.param(*c[1:], id=py(JS, c[0])) for c in SET_LOOKUPS]
)
def test_jwt_bundle_set_lookup(domains: tuple[str, ...], subject_domain: str, detail: str | None) -> None:
    token = _jwt("kid1", EC, "ES384", trust_domain=subject_domain)
    verified = expect(lambda: _verify(AUTHORITIES, token, domains), detail)
    if detail is None:
        assert verified is not None and verified.trust_domain == subject_domain
