"""JWT-SVID verification pitfalls (JWT-SVID §2, §2.1, §3)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.errors import IdentityError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.jwtsvid import JwtSvidVerifier

AUD = "spiffe://example.org/ns/agents/sa/worker"
SUB = "spiffe://example.org/ns/a/sa/caller"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "partner": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture
def verifier(keys: dict[str, Any]) -> JwtSvidVerifier:
    bundles = TrustBundles(
        jwt={
            "example.org": {
                "k-ec": keys["ec"].public_key(),
                "k-ec384": keys["ec384"].public_key(),
                "k-rsa": keys["rsa"].public_key(),
            },
            "partner.example": {"k-partner": keys["partner"].public_key()},
        }
    )
    return JwtSvidVerifier(bundles, [AUD])


def claims(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"sub": SUB, "aud": AUD, "exp": int(time.time()) + 300, "iat": int(time.time())}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("alg", "kid", "key"),
    [("ES256", "k-ec", "ec"), ("ES384", "k-ec384", "ec384"), ("RS256", "k-rsa", "rsa"), ("PS512", "k-rsa", "rsa")],
)
def test_valid_tokens(verifier: JwtSvidVerifier, keys: dict[str, Any], alg: str, kid: str, key: str) -> None:
    token = jwt.encode(claims(), keys[key], algorithm=alg, headers={"kid": kid, "typ": "JWT"})
    verified = verifier.verify(token, now=time.time())
    assert verified.spiffe_id == SUB and verified.trust_domain == "example.org"


def test_audience_list_with_one_match(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(
        claims(aud=["spiffe://elsewhere/x", AUD]), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"}
    )
    assert verifier.verify(token, now=time.time()).spiffe_id == SUB


def _expect(verifier: JwtSvidVerifier, token: str, detail: str) -> None:
    with pytest.raises(IdentityError) as info:
        verifier.verify(token, now=time.time())
    assert info.value.detail == detail, info.value


def test_alg_none(verifier: JwtSvidVerifier) -> None:
    token = f"{_b64({'alg': 'none', 'kid': 'k-ec'})}.{_b64(claims())}."
    _expect(verifier, token, "jwt_svid_bad_algorithm")


def test_hs256_signed_with_the_public_key_as_secret(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    public_pem = (
        keys["ec"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    import hashlib
    import hmac

    signing_input = f"{_b64({'alg': 'HS256', 'kid': 'k-ec'})}.{_b64(claims())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    _expect(verifier, token, "jwt_svid_bad_algorithm")


def test_missing_aud(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    _expect(
        verifier,
        jwt.encode(claims(aud=None), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"}),
        "jwt_svid_missing_claim",
    )


def test_wrong_aud(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    _expect(
        verifier,
        jwt.encode(claims(aud=["spiffe://x/y"]), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"}),
        "jwt_svid_bad_audience",
    )


def test_missing_exp(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    _expect(
        verifier,
        jwt.encode(claims(exp=None), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"}),
        "jwt_svid_missing_claim",
    )


def test_expired(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"})
    _expect(verifier, token, "jwt_svid_expired")


def test_crit_header(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "k-ec", "crit": ["exp"]})
    _expect(verifier, token, "jwt_svid_bad_header")


@pytest.mark.parametrize("header", [{"jku": "https://evil/jwks"}, {"x5u": "https://evil/c"}, {"cty": "JWT"}])
def test_other_headers(verifier: JwtSvidVerifier, keys: dict[str, Any], header: dict[str, str]) -> None:
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "k-ec", **header})
    _expect(verifier, token, "jwt_svid_bad_header")


def test_bad_typ(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "k-ec", "typ": "at+jwt"})
    _expect(verifier, token, "jwt_svid_bad_header")


def test_missing_kid(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    _expect(verifier, jwt.encode(claims(), keys["ec"], algorithm="ES256"), "jwt_svid_bad_header")


def test_kid_only_in_another_trust_domains_bundle(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    # signed by partner.example's key, claiming an example.org subject
    token = jwt.encode(claims(), keys["partner"], algorithm="ES256", headers={"kid": "k-partner"})
    _expect(verifier, token, "jwt_svid_unknown_key")


def test_signature_from_another_key_with_a_known_kid(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(claims(), keys["partner"], algorithm="ES256", headers={"kid": "k-ec"})
    _expect(verifier, token, "jwt_svid_bad_signature")


def test_subject_trust_domain_without_bundle(verifier: JwtSvidVerifier, keys: dict[str, Any]) -> None:
    token = jwt.encode(
        claims(sub="spiffe://stranger.example/a"), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"}
    )
    _expect(verifier, token, "jwt_svid_unknown_trust_domain")


@pytest.mark.parametrize(
    "sub", ["spiffe://example.org", "spiffe://Example.org/a", "not-spiffe", 42, "spiffe://example.org/a/../b"]
)
def test_invalid_subjects(verifier: JwtSvidVerifier, keys: dict[str, Any], sub: object) -> None:
    token = jwt.encode(claims(sub=sub), keys["ec"], algorithm="ES256", headers={"kid": "k-ec"})
    _expect(verifier, token, "jwt_svid_invalid_subject")


@pytest.mark.parametrize(
    "token", ["", "a.b", "a.b.c", "!!!.???.***", "x" * 20_000, f"{_b64({'alg': 'ES256'})}.bm90anNvbg.x"]
)
def test_malformed(verifier: JwtSvidVerifier, token: str) -> None:
    with pytest.raises(IdentityError) as info:
        verifier.verify(token, now=time.time())
    assert info.value.detail.startswith("jwt_svid_")
