"""py-spiffe ``spiffe/tests/unit/svid/jwtsvid``: ``test_jwt_svid.py`` and ``test_jwt_svid_validator.py``.

Tokens are built like py-spiffe's ``generate_test_jwt_token`` (header ``alg``/``typ: JWT``/``kid``,
claims ``aud``/``sub``/``exp``), signed by real keys in the bundle. Three adaptations, each kept
narrow so the case still tests what it names:

* py-spiffe's subject is ``spiffe://test.com`` (a trust domain, no workload path); ours is
  ``spiffe://test.com/workload`` - a JWT-SVID names a workload (JWT-SVID §3.1) and we refuse a
  root ID; one case below keeps the upstream subject and records that difference;
* ``parse_insecure`` and ``JwtSvidValidator.validate_claims`` / ``validate_header`` cases run
  through the verifier (we never read a token without verifying it), signed correctly, with a ``kid``;
* where a ``validate_claims`` case's subject is ``spiffeid://...`` but the case is about another
  claim, the subject is a valid SPIFFE ID (``validate_claims`` does not read ``sub``'s form; we do, first);
* ``validate_claims`` cases expire a day ahead (no ``iat``), longer than the default maximum
  lifetime (``ingress.jwt_svid_max_lifetime``, 1 h): their verifier is given the largest one a
  configuration may set (24 h), so they test the claim they name.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sidecar.identity.bundles import TrustBundles
from sidecar.identity.jwtsvid import JwtSvidVerifier
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, py

S, V = "jwtsvid/test_jwt_svid", "jwtsvid/test_jwt_svid_validator"
TD = "test.com"
WORKLOAD = f"spiffe://{TD}/workload"
AUDIENCE = ["joe", "test", "other"]
RSA = fx.cached_key("rsa-2048")
RSA2 = fx.new_key("rsa-2048")
EC384 = fx.cached_key("ec-p384")
EC521 = fx.cached_key("ec-p521")
PUBLIC = {"kid1": RSA.public_key(), "kid_ec": EC521.public_key(), "kid_ec384": EC384.public_key()}
KEY_FOR = {"kid1": RSA, "kid_ec": EC521, "kid_ec384": EC384}
ALG_FOR = {"kid1": "RS256", "kid_ec": "ES512", "kid_ec384": "ES384"}

# The cases where we differ from the upstream, and why: tests.support.conformance.DIFFERENT


def _verify(token: str, audience: list[str] | None = None, bundle: dict[str, Any] | None = None) -> Any:
    verifier = JwtSvidVerifier(TrustBundles(jwt={TD: bundle or PUBLIC}), audience or ["test"])
    return verifier.verify(token, now=time.time())


def _token(
    *,
    kid: str = "kid1",
    sub: Any = WORKLOAD,
    aud: Any = None,
    exp: Any = "in 1h",
    key: Any = None,
    omit: tuple[str, ...] = (),
    **extra: Any,
) -> str:
    """``generate_test_jwt_token``: RS256 with ``kid1`` unless told otherwise; ``omit`` leaves claims out."""
    alg = extra.pop("alg", ALG_FOR.get(kid, "RS256"))
    body = fx.claims(sub, aud if aud is not None else AUDIENCE, exp=exp, **extra)
    for claim in omit:
        body.pop(claim, None)
    signer = key if key is not None else KEY_FOR.get(kid, RSA)
    return fx.jws({"alg": alg, "typ": "JWT", "kid": kid}, body, signer)


def _corrupt(token: str, part: int) -> str:
    parts = token.split(".")
    parts[part] = "err" + parts[part][3:] if part == 0 else parts[part][:30] + "sxthrtm" + parts[part][37:]
    return ".".join(parts)


# -- test_jwt_svid.py ------------------------------------------------------------------------------
SVID_CASES: list[tuple[str, Any, Any, list[str] | None, str | None]] = [
    ("test_parse_insecure_invalid_input", None, lambda: "", None, "jwt_svid_malformed"),
    ("test_parse_insecure_invalid_claims", 0, lambda: _token(omit=("aud",)), ["spire"], "jwt_svid_missing_claim"),
    (
        "test_parse_insecure_invalid_claims",
        1,
        lambda: _token(exp=None, kid="kid_ec384"),
        None,
        "jwt_svid_missing_claim",
    ),
    ("test_parse_insecure_invalid_claims", 2, lambda: _token(sub=None, alg="RS512"), None, "jwt_svid_missing_claim"),
    ("test_parse_insecure_invalid_claims", 3, lambda: _token(exp="1m ago", alg="PS512"), None, "jwt_svid_expired"),
    ("test_parse_insecure_invalid_token", 0, lambda: _corrupt(_token(), 1), ["spire"], "jwt_svid_malformed"),
    ("test_parse_insecure_invalid_token", 1, lambda: _corrupt(_token(), 0), ["spire"], "jwt_svid_malformed"),
    ("test_parse_insecure_valid", 0, lambda: _token(aud=["joe"]), ["joe"], None),
    ("test_parse_insecure_valid", 1, lambda: _token(aud=["joe", "test", "valid"], alg="PS384"), None, None),
    ("test_parse_and_validate_invalid_parameters", None, lambda: "", ["spire"], "jwt_svid_malformed"),
    ("test_parse_and_validate_invalid_missing_kid_header", None, lambda: _token(kid=""), None, "jwt_svid_bad_header"),
    ("test_parse_and_validate_invalid_missing_sub", None, lambda: _token(sub=""), None, "jwt_svid_missing_claim"),
    ("test_parse_and_validate_invalid_missing_kid", None, lambda: _token(kid="kid10"), None, "jwt_svid_unknown_key"),
    ("test_parse_and_validate_valid_token_RSA", None, _token, None, None),
    ("test_parse_and_validate_valid_token_EC", None, lambda: _token(kid="kid_ec"), None, None),
    (
        "test_parse_and_validate_valid_token_single_string_aud",
        None,
        lambda: _token(aud="single-audience"),
        ["single-audience"],
        None,
    ),
    # DIFFERENT: an iat beyond the leeway is refused
    (
        "test_parse_and_validate_valid_token_future_iat",
        None,
        lambda: _token(iat=int(time.time()) + 3600),
        None,
        "jwt_svid_issued_in_future",
    ),
    ("test_parse_and_validate_valid_token_multiple_keys_bundle", "ec", lambda: _token(kid="kid_ec"), None, None),
    ("test_parse_and_validate_valid_token_multiple_keys_bundle", "rsa", lambda: _token(kid="kid1"), None, None),
    # DIFFERENT: the upstream's own subject, a trust domain ID without a path
    (
        "test_parse_and_validate_valid_token_RSA",
        "sub=spiffe://test.com",
        lambda: _token(sub=f"spiffe://{TD}"),
        None,
        "jwt_svid_invalid_subject",
    ),
]


@pytest.mark.parametrize(
    ("build", "audience", "detail"), [pytest.param(c[2], c[3], c[4], id=py(S, c[0], c[1])) for c in SVID_CASES]
)
def test_jwt_svid(build: Any, audience: list[str] | None, detail: str | None) -> None:
    token = build()
    verified = expect(lambda: _verify(token, audience), detail)
    if detail is None:
        assert verified is not None and verified.spiffe_id == WORKLOAD


@pytest.mark.parametrize("_", [pytest.param(0, id=py(S, "test_parse_and_validate_invalid_kid_mismatch"))])
def test_kid_names_another_key(_: int) -> None:
    """``kid10`` names another RSA key than the one that signed: the signature does not verify."""
    token = _token(kid="kid10", key=RSA)
    expect(lambda: _verify(token, bundle={**PUBLIC, "kid10": RSA2.public_key()}), "jwt_svid_bad_signature")


# -- test_jwt_svid_validator.py: validate_claims -----------------------------------------------------
def _claims_token(claims: dict[str, Any]) -> str:
    return fx.jws({"alg": "RS256", "typ": "JWT", "kid": "kid1"}, claims, RSA)


NOW = int(time.time())
LATER = NOW + 24 * 3600
INVALID_SUB = "spiffeid://somewhere.over.the"
CLAIM_CASES: list[tuple[str, Any, dict[str, Any], list[str], str | None]] = [
    (
        "test_invalid_input_validate_claims",
        None,
        {"exp": LATER, "aud": ["test"], "sub": WORKLOAD},
        [],
        "jwt_svid_bad_audience",
    ),
    (
        "test_validate_claims_invalid_aud",
        0,
        {"exp": LATER, "aud": [""], "sub": INVALID_SUB},
        [""],
        "jwt_svid_bad_audience",
    ),
    (
        "test_validate_claims_invalid_aud",
        1,
        {"exp": LATER, "aud": ["", "", ""], "sub": INVALID_SUB},
        ["test"],
        "jwt_svid_bad_audience",
    ),
    (
        "test_validate_claims_invalid_aud",
        2,
        {"exp": LATER, "aud": ["something"], "sub": WORKLOAD},
        [""],
        "jwt_svid_bad_audience",
    ),
    (
        "test_validate_claims_invalid_aud",
        3,
        {"exp": LATER, "aud": ["something"], "sub": WORKLOAD},
        ["something", "matters"],
        None,
    ),  # DIFFERENT
    (
        "test_validate_claims_invalid_aud",
        4,
        {"exp": LATER, "aud": ["something"], "sub": WORKLOAD},
        ["else", "matters"],
        "jwt_svid_bad_audience",
    ),
    (
        "test_validate_claims_token_expired",
        0,
        {"exp": "1611075778", "aud": ["something"], "sub": WORKLOAD},
        ["something"],
        "jwt_svid_malformed",
    ),  # DIFFERENT
    (
        "test_validate_claims_token_expired",
        1,
        {"exp": NOW - 24 * 3600, "aud": ["something", "more things", "even more things"], "sub": WORKLOAD},
        ["even more things"],
        "jwt_svid_expired",
    ),
    (
        "test_validate_claims_token_expired",
        2,
        {"exp": NOW - 3600, "aud": ["something", "more things"], "sub": WORKLOAD},
        ["even more things", "more things"],
        "jwt_svid_expired",
    ),
    (
        "test_validate_claims_token_expired",
        3,
        {"exp": NOW - 60, "aud": ["something", "more things", "even more things"], "sub": WORKLOAD},
        ["more things"],
        "jwt_svid_expired",
    ),
    (
        "test_validate_claims_single_string_aud",
        0,
        {"exp": LATER, "aud": "something", "sub": WORKLOAD},
        ["something"],
        None,
    ),
    (
        "test_validate_claims_missing_required_claim",
        0,
        {"aud": None, "exp": "ttt", "sub": INVALID_SUB},
        ["x"],
        "jwt_svid_missing_claim",
    ),
    (
        "test_validate_claims_missing_required_claim",
        1,
        {"aud": [], "exp": "ttt", "sub": INVALID_SUB},
        ["x"],
        "jwt_svid_missing_claim",
    ),
    ("test_validate_claims_missing_required_claim", 2, {"aud": "ttt", "exp": "ttt"}, ["x"], "jwt_svid_missing_claim"),
    ("test_validate_claims_missing_required_claim", 3, {"sub": "ttt", "exp": "ttt"}, ["ttt"], "jwt_svid_missing_claim"),
    ("test_validate_claims_missing_required_claim", 4, {"sub": "ttt", "aud": "ttt"}, ["ttt"], "jwt_svid_missing_claim"),
    (
        "test_validate_claims_missing_required_claim",
        5,
        {"sub": "ttt", "aud": "ttt", "exp": ""},
        ["x"],
        "jwt_svid_missing_claim",
    ),
    ("test_validate_claims_missing_required_claim", 6, {}, ["x"], "jwt_svid_missing_claim"),
    ("test_validate_claims_valid_input", 0, {"exp": LATER, "aud": ["something"], "sub": WORKLOAD}, ["something"], None),
    (
        "test_validate_claims_valid_input",
        1,
        {"exp": NOW + 300, "aud": ["something", "more things"], "sub": WORKLOAD},
        ["something", "more things"],
        None,
    ),
    (
        "test_validate_claims_valid_input",
        2,
        {"exp": NOW + 900, "aud": ["something", "more things", "even more things"], "sub": WORKLOAD},
        ["something", "more things"],
        None,
    ),
]


@pytest.mark.parametrize(
    ("claims", "audience", "detail"), [pytest.param(c[2], c[3], c[4], id=py(V, c[0], c[1])) for c in CLAIM_CASES]
)
def test_validate_claims(claims: dict[str, Any], audience: list[str], detail: str | None) -> None:
    token = _claims_token({k: v for k, v in claims.items() if v is not None or k == "aud"})
    verifier = JwtSvidVerifier(TrustBundles(jwt={TD: PUBLIC}), audience, max_lifetime=24 * 3600)
    expect(lambda: verifier.verify(token, now=time.time()), detail)


# -- test_jwt_svid_validator.py: validate_header -------------------------------------------------------
def _header_token(header: dict[str, Any]) -> str:
    alg = header.get("alg")
    key = {"RS256": RSA, "PS512": RSA, "PS256": RSA, "ES384": EC384}.get(str(alg))
    kid = "kid_ec384" if alg == "ES384" else "kid1"
    full = {**header, "kid": kid} if "alg" in header else header
    return fx.jws(full, fx.claims(WORKLOAD, ["test"]), key)


HEADER_CASES: list[tuple[str, int, dict[str, Any], str | None]] = [
    ("test_validate_header_invalid_input", 0, {"ttt": "eee"}, "jwt_svid_bad_header"),
    ("test_validate_header_invalid_input", 1, {"alg": ""}, "jwt_svid_bad_algorithm"),
    ("test_validate_header_invalid_algorithm", 0, {"alg": "eee"}, "jwt_svid_bad_algorithm"),
    ("test_validate_header_invalid_algorithm", 1, {"alg": "RS256 RS384"}, "jwt_svid_bad_algorithm"),
    ("test_validate_header_invalid_type", 0, {"alg": "RS256", "typ": "xxx"}, "jwt_svid_bad_header"),
    ("test_validate_header_valid_headers", 0, {"alg": "RS256", "typ": "JOSE"}, None),
    ("test_validate_header_valid_headers", 1, {"alg": "PS512", "typ": "JWT"}, None),
    ("test_validate_header_valid_headers", 2, {"alg": "ES384", "typ": ""}, "jwt_svid_bad_header"),  # DIFFERENT
    ("test_validate_header_valid_headers", 3, {"alg": "PS256"}, None),
]


@pytest.mark.parametrize(("header", "detail"), [pytest.param(c[2], c[3], id=py(V, c[0], c[1])) for c in HEADER_CASES])
def test_validate_header(header: dict[str, Any], detail: str | None) -> None:
    token = _header_token(header)
    expect(lambda: _verify(token), detail)
