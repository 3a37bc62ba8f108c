"""Property: every JWT-SVID failure is a stable ``jwt_svid_*`` code; nothing else escapes the identity package.

Over header algorithm x the bundle key's type x its curve x the key (and algorithm) that really
signed, plus mutated headers, claims and raw bytes: ``JwtSvidVerifier.verify`` either accepts - and
then the token was signed by exactly the bundle key with the algorithm its header names, which that
key type serves (JWT-SVID §2.1, RFC 7518 §3) - or raises ``IdentityError`` with one of the documented
codes. A ``kid`` naming a key of another type than ``alg`` needs (RS/PS -> EC, ES -> RSA, ES256 ->
P-384...) is always ``jwt_svid_bad_signature``, never PyJWT's ``TypeError``; and the ingress decision
for such a token is ``untrusted_identity`` with that detail, not ``internal_error``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from sidecar.decision import AuthzRequest, Direction, Reason
from sidecar.errors import IdentityError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.jwtsvid import ALLOWED_ALGORITHMS, JwtSvidVerifier
from sidecar.runtime import Runtime
from tests.support import spiffe_testdata as fx
from tests.support.config import AGENT, PLANNER, add_file_identity, base_config, task, write_config, write_keys

JWT_CODES = frozenset(
    {
        "jwt_svid_malformed",
        "jwt_svid_bad_header",
        "jwt_svid_bad_algorithm",
        "jwt_svid_invalid_subject",
        "jwt_svid_unknown_trust_domain",
        "jwt_svid_unknown_key",
        "jwt_svid_bad_signature",
        "jwt_svid_missing_claim",
        "jwt_svid_bad_audience",
        "jwt_svid_expired",
    }
)
KEY_KINDS = ["rsa-2048", "ec-p256", "ec-p384", "ec-p521", "ec-k256", "ed25519"]
SIGNING_ALGS = sorted(set(get_default_algorithms()) - {"none"})
HEADER_ALGS = [*sorted(ALLOWED_ALGORITHMS), "HS256", "none", "EdDSA", "ES256K", "RS1", "", "es256"]
CURVE_FOR = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
TD = "example.org"
SUBJECT = f"spiffe://{TD}/caller"
AUDIENCE = "spiffe://example.org/agent"


def serves(alg: str, kind: str) -> bool:
    """Whether a ``kind`` key verifies ``alg`` signatures (RFC 7518 §3.3-§3.5)."""
    key = fx.cached_key(kind).public_key()
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and CURVE_FOR.get(alg) == key.curve.name


def signature(signing_input: bytes, kind: str | None, alg: str, garbage: bytes) -> bytes:
    """A real signature by the ``kind`` key with ``alg`` when PyJWT can make one, else ``garbage``."""
    if kind is None:
        return garbage
    algorithm = get_default_algorithms()[alg]
    try:
        return algorithm.sign(signing_input, algorithm.prepare_key(fx.cached_key(kind)))  # type: ignore[arg-type]
    except Exception:  # an algorithm this key type cannot sign with: the signature is just bytes
        return garbage


def verifier(bundle_kind: str) -> JwtSvidVerifier:
    bundles = TrustBundles(jwt={TD: {"k1": fx.cached_key(bundle_kind).public_key()}})  # type: ignore[dict-item]
    return JwtSvidVerifier(bundles, [AUDIENCE])


def outcome(run: Any) -> str:
    """``"ok"`` or the sub-code; any other exception fails the property."""
    try:
        run()
    except IdentityError as exc:
        assert exc.detail in JWT_CODES, exc
        assert str(exc).startswith(exc.detail)
        return exc.detail
    return "ok"


claims_strategy = st.sampled_from(["valid", "expired", "other-audience", "no-aud", "bad-sub", "string-exp", "list-aud"])


def make_claims(kind: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "valid": {"sub": SUBJECT, "aud": [AUDIENCE], "exp": now + 300},
        "expired": {"sub": SUBJECT, "aud": AUDIENCE, "exp": now - 5},
        "other-audience": {"sub": SUBJECT, "aud": ["spiffe://example.org/other"], "exp": now + 300},
        "no-aud": {"sub": SUBJECT, "exp": now + 300},
        "bad-sub": {"sub": "spiffe://EXAMPLE.org/caller", "aud": AUDIENCE, "exp": now + 300},
        "string-exp": {"sub": SUBJECT, "aud": AUDIENCE, "exp": str(now + 300)},
        "list-aud": {"sub": SUBJECT, "aud": [AUDIENCE, 7], "exp": now + 300},
    }[kind]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header_alg=st.sampled_from(HEADER_ALGS),
    bundle_kind=st.sampled_from(KEY_KINDS),
    signer_kind=st.one_of(st.none(), st.sampled_from(KEY_KINDS)),
    signing_alg=st.sampled_from(SIGNING_ALGS),
    claims_kind=claims_strategy,
    garbage=st.binary(min_size=0, max_size=140),
)
@example("RS256", "ec-p384", "rsa-2048", "RS256", "valid", b"")  # go-spiffe "mismatched JWT authority"
@example("PS256", "ec-p256", "rsa-2048", "PS256", "valid", b"")
@example("ES256", "rsa-2048", "ec-p256", "ES256", "valid", b"")
@example("ES256", "ec-p384", "ec-p384", "ES384", "valid", b"")  # the right type, the wrong curve
@example("ES512", "ec-p521", "ec-p521", "ES512", "valid", b"")  # accepted
def test_every_failure_is_a_stable_code(
    header_alg: str,
    bundle_kind: str,
    signer_kind: str | None,
    signing_alg: str,
    claims_kind: str,
    garbage: bytes,
) -> None:
    header = {"alg": header_alg, "kid": "k1", "typ": "JWT"}
    head = fx.b64url(json.dumps(header).encode())
    body = fx.b64url(json.dumps(make_claims(claims_kind)).encode())
    signing_input = f"{head}.{body}".encode()
    token = f"{head}.{body}.{fx.b64url(signature(signing_input, signer_kind, signing_alg, garbage))}"
    result = outcome(lambda: verifier(bundle_kind).verify(token, now=time.time()))
    if result == "ok":
        # only a genuine token: valid claims, signed by the bundle key with the header's algorithm
        assert claims_kind == "valid" and header_alg in ALLOWED_ALGORITHMS
        assert signer_kind == bundle_kind and signing_alg == header_alg and serves(header_alg, bundle_kind)
    if header_alg in ALLOWED_ALGORITHMS and not serves(header_alg, bundle_kind) and claims_kind == "valid":
        assert result == "jwt_svid_bad_signature"  # algorithm/key-type mismatch: a signature failure
    if header_alg not in ALLOWED_ALGORITHMS:
        assert result == "jwt_svid_bad_algorithm"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "x5c", "jku"]), json_values, max_size=4),
    claims=st.dictionaries(st.sampled_from(["sub", "aud", "exp", "nbf", "iat", "iss"]), json_values, max_size=6),
    bundle_kind=st.sampled_from(KEY_KINDS),
)
def test_arbitrary_headers_and_claims_never_escape(
    header: dict[str, Any], claims: dict[str, Any], bundle_kind: str
) -> None:
    head = fx.b64url(json.dumps(header).encode())
    body = fx.b64url(json.dumps(claims).encode())
    outcome(lambda: verifier(bundle_kind).verify(f"{head}.{body}.{fx.b64url(bytes(64))}", now=time.time()))


@settings(max_examples=300, deadline=None)
@given(token=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_strings_never_escape(token: str) -> None:
    outcome(lambda: verifier("ec-p256").verify(token, now=time.time()))


def test_a_deeply_nested_header_is_malformed_not_a_recursion_error() -> None:
    nested = "[" * 100_000 + "]" * 100_000
    token = f"{fx.b64url(nested.encode())}.{fx.b64url(b'{}')}.{fx.b64url(bytes(64))}"
    assert outcome(lambda: verifier("ec-p256").verify(token[:16000], now=time.time())) == "jwt_svid_malformed"
    small = "[" * 5000 + "]" * 5000
    token = f"{fx.b64url(small.encode())}.{fx.b64url(b'{}')}.{fx.b64url(bytes(64))}"
    assert outcome(lambda: verifier("ec-p256").verify(token, now=time.time())) == "jwt_svid_malformed"


@pytest.mark.parametrize(("alg", "signer"), [("RS256", "rsa-2048"), ("PS384", "rsa-2048"), ("ES256", "ec-p256")])
def test_a_mismatched_kid_is_an_untrusted_identity_decision_not_internal_error(
    tmp_path: Path, alg: str, signer: str
) -> None:
    """End to end through the runtime: the bundle's ``kid`` names the dev CA's EC key (or, for ES256, we
    put an RSA key under it), the token is signed by another key type."""
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    cas = add_file_identity(tmp_path, config)
    config["ingress"] = {
        "rules": [{"callers": [{"id": PLANNER}], "methods": ["GET"], "paths": ["*"]}],
        "jwt_svid": True,
    }
    ca = cas["test.example"]
    if alg.startswith("ES"):  # replace the JWT bundle: kid -> an RSA key
        jwks = fx.document([fx.public_jwk(fx.cached_key("rsa-2048"), kid=ca.jwt_kid, use="jwt-svid")])
        (tmp_path / "cas" / "test.example" / "jwt-bundle.json").write_bytes(jwks)
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml")
    now = int(time.time())
    token = fx.jws(
        {"alg": alg, "kid": ca.jwt_kid, "typ": "JWT"},
        {"sub": PLANNER, "aud": [AGENT], "exp": now + 60},
        fx.cached_key(signer),
    )
    request = AuthzRequest(
        Direction.INGRESS, "GET", "https", "agent.local", "/v1/status", {"authorization": f"Bearer {token}"}
    )
    decision = runtime.decide(request, "d1")
    assert decision.reason is Reason.UNTRUSTED_IDENTITY
    assert decision.detail.startswith("jwt_svid_bad_signature")
