"""go-spiffe ``v2/svid/jwtsvid``: ``svid_test.go`` ``TestParseAndValidate``.

The upstream bundle holds ``authority1`` (an EC P-384 key) and ``authority2`` (an RSA-2048 key);
tokens are signed the way its ``generateToken`` does (``typ: JWT`` unless the case sets one, the
``kid`` given, claims ``sub``/``iss``/``exp``/``aud``/``iat``). Where the upstream passes no expected
audience (go-spiffe then skips the audience check) we pass the token's own audience: our verifier
always requires one (JWT-SVID §3.2). ``TestParseInsecure`` reads tokens without verifying them; we
never do, so its cases run through the verifier with correctly signed tokens (the claim and header
rules they check apply all the same). ``TestMarshal`` is a Go API detail (docs/identity-conformance.md).
"""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt
import pytest

from sidecar.identity.bundles import TrustBundles
from sidecar.identity.jwtsvid import JwtSvidVerifier
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, go

TD = "trustdomain"
HOST = f"spiffe://{TD}/host"
KEY1 = fx.cached_key("ec-p384")
KEY2 = fx.cached_key("rsa-2048")
BUNDLES = TrustBundles(jwt={TD: {"authority1": KEY1.public_key(), "authority2": KEY2.public_key()}})  # type: ignore[dict-item]


def _token(claims: dict[str, Any], key: Any, kid: str, typ: str = "") -> str:
    """go-spiffe's ``generateToken``: alg from the key (ES384 for P-384, RS256 for RSA), ``typ: JWT`` unless given."""
    alg = "ES384" if key is KEY1 else "RS256"
    header: dict[str, Any] = {"alg": alg, "typ": typ or "JWT"}
    if kid:
        header["kid"] = kid  # go-jose leaves an empty key ID out
    return fx.jws(header, claims, key)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"sub": HOST, "iss": "issuer", "exp": now + 60, "aud": ["audience"], "iat": now}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _hs256() -> str:
    """Like the upstream's fixed HS256 token: no kid, a non-SPIFFE subject, an HMAC signature."""
    return pyjwt.encode({"sub": "1234567890", "name": "John Doe", "iat": 1516239022}, "secret" * 6, algorithm="HS256")


CASES: list[tuple[str, Any, list[str], str | None]] = [
    ("success", lambda: _token(_claims(), KEY1, "authority1"), ["audience"], None),
    ("malformed", lambda: "invalid token", ["audience"], "jwt_svid_malformed"),
    ("unsupported algorithm", _hs256, ["audience"], "jwt_svid_bad_algorithm"),
    ("missing subject", lambda: _token(_claims(sub=None), KEY1, "authority1"), ["audience"], "jwt_svid_missing_claim"),
    (
        "missing expiration claim",
        lambda: _token(_claims(exp=None), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_missing_claim",
    ),
    (
        "expired",
        lambda: _token(_claims(exp=int(time.time()) - 60), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_expired",
    ),
    ("unexpected audience", lambda: _token(_claims(), KEY1, "authority1"), ["another"], "jwt_svid_bad_audience"),
    (
        "invalid subject claim",
        lambda: _token(_claims(sub="invalid subject"), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_invalid_subject",
    ),
    ("missing key", lambda: _token(_claims(), KEY1, ""), ["audience"], "jwt_svid_bad_header"),
    (
        "no bundle for trust domain",
        lambda: _token(_claims(sub="spiffe://another.domain/host"), KEY1, "noAuthority"),
        ["audience"],
        "jwt_svid_unknown_trust_domain",
    ),
    ("no bundle for authority", lambda: _token(_claims(), KEY1, "noKey"), ["audience"], "jwt_svid_unknown_key"),
    # the RSA key signs, the kid names the EC key: PyJWT raised TypeError here before
    ("mismatched JWT authority", lambda: _token(_claims(), KEY2, "authority1"), ["audience"], "jwt_svid_bad_signature"),
    ("invalid typ", lambda: _token(_claims(), KEY1, "authority1", "invalid"), ["audience"], "jwt_svid_bad_header"),
]


@pytest.mark.parametrize(
    ("build", "audience", "detail"),
    [pytest.param(b, a, d, id=go("jwtsvid", "TestParseAndValidate", name)) for name, b, a, d in CASES],
)
def test_parse_and_validate(build: Any, audience: list[str], detail: str | None) -> None:
    token = build()
    verified = expect(lambda: JwtSvidVerifier(BUNDLES, audience).verify(token, now=time.time()), detail)
    if detail is None:
        claims = pyjwt.decode(token, options={"verify_signature": False})
        assert verified is not None and verified.spiffe_id == HOST and verified.trust_domain == TD
        assert verified.exp == claims["exp"]


INSECURE_CASES: list[tuple[str, Any, list[str], str | None]] = [
    ("success", lambda: _token(_claims(), KEY1, "authority1"), ["audience"], None),
    ("malformed", lambda: "invalid token", ["audience"], "jwt_svid_malformed"),
    ("invalid algorithm", _hs256, ["audience"], "jwt_svid_bad_algorithm"),
    (
        "missing subject claim",
        lambda: _token(_claims(sub=None), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_missing_claim",
    ),
    (
        "missing expiration claim",
        lambda: _token(_claims(exp=None), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_missing_claim",
    ),
    (
        "expired",
        lambda: _token(_claims(exp=int(time.time()) - 60), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_expired",
    ),
    ("unexpected audience", lambda: _token(_claims(), KEY1, "authority1"), ["another"], "jwt_svid_bad_audience"),
    (
        "invalid subject claim",
        lambda: _token(_claims(sub="invalid subject"), KEY1, "authority1"),
        ["audience"],
        "jwt_svid_invalid_subject",
    ),
    # the upstream reuses the name "success" for its invalid-typ case: Go runs it as success#01
    ("success#01", lambda: _token(_claims(), KEY1, "authority1", "invalid"), ["audience"], "jwt_svid_bad_header"),
]


@pytest.mark.parametrize(
    ("build", "audience", "detail"),
    [pytest.param(b, a, d, id=go("jwtsvid", "TestParseInsecure", name)) for name, b, a, d in INSECURE_CASES],
)
def test_parse_insecure(build: Any, audience: list[str], detail: str | None) -> None:
    token = build()
    verified = expect(lambda: JwtSvidVerifier(BUNDLES, audience).verify(token, now=time.time()), detail)
    if detail is None:
        assert verified is not None and verified.spiffe_id == HOST
