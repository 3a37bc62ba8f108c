"""JWT-SVID time claims as a kind: ``exp``, ``nbf``, ``iat`` and the lifetime, at every offset from now
(JWT-SVID §3, RFC 7519 §4.1.4-§4.1.6), with a bounded leeway and a configured maximum lifetime."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import IdentityError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.jwtsvid import JwtSvidVerifier

AUD = "spiffe://example.org/ns/agents/sa/worker"
SUB = "spiffe://example.org/ns/a/sa/caller"
NOW = 1_800_000_000
KEY = ec.generate_private_key(ec.SECP256R1())
BUNDLES = TrustBundles(jwt={"example.org": {"k": KEY.public_key()}})


def _token(**times: int | None) -> str:
    claims: dict[str, Any] = {"sub": SUB, "aud": AUD, **{k: v for k, v in times.items() if v is not None}}
    return jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": "k"})


def _outcome(verifier: JwtSvidVerifier, token: str) -> str:
    try:
        verifier.verify(token, now=NOW)
    except IdentityError as exc:
        return str(exc.detail)
    return "ok"


def _expected(exp: int, nbf: int | None, iat: int | None, leeway: float, max_lifetime: float) -> str:
    """The rule, stated once: the first failing check names the outcome."""
    if exp + leeway <= NOW:
        return "jwt_svid_expired"
    if nbf is not None and NOW + leeway < nbf:
        return "jwt_svid_not_yet_valid"
    if iat is not None and iat > NOW + leeway:
        return "jwt_svid_issued_in_future"
    start = iat if iat is not None else nbf if nbf is not None else NOW
    if exp < start:
        return "jwt_svid_expired"
    if exp - start > max_lifetime:
        return "jwt_svid_lifetime_too_long"
    return "ok"


offsets = st.integers(min_value=-3 * 3600, max_value=3 * 3600)


@settings(max_examples=400, deadline=None)
@given(
    exp=offsets,
    nbf=st.none() | offsets,
    iat=st.none() | offsets,
    leeway=st.sampled_from([0.0, 1.0, 30.0, 300.0]),
    max_lifetime=st.sampled_from([60.0, 3600.0, 86400.0]),
)
def test_every_offset_gets_the_rule(
    exp: int, nbf: int | None, iat: int | None, leeway: float, max_lifetime: float
) -> None:
    verifier = JwtSvidVerifier(BUNDLES, [AUD], leeway=leeway, max_lifetime=max_lifetime)
    token = _token(exp=NOW + exp, nbf=None if nbf is None else NOW + nbf, iat=None if iat is None else NOW + iat)
    expected = _expected(
        NOW + exp, None if nbf is None else NOW + nbf, None if iat is None else NOW + iat, leeway, max_lifetime
    )
    assert _outcome(verifier, token) == expected


@pytest.mark.parametrize(
    ("times", "outcome"),
    [
        ({"exp": NOW + 300, "iat": NOW}, "ok"),
        ({"exp": NOW - 29, "iat": NOW - 300}, "ok"),  # inside the 30 s leeway
        ({"exp": NOW - 30, "iat": NOW - 300}, "jwt_svid_expired"),  # at exp + leeway
        ({"exp": NOW + 300, "nbf": NOW + 30}, "ok"),
        ({"exp": NOW + 300, "nbf": NOW + 31}, "jwt_svid_not_yet_valid"),
        ({"exp": NOW + 300, "iat": NOW + 30}, "ok"),
        ({"exp": NOW + 3600, "iat": NOW + 31}, "jwt_svid_issued_in_future"),
        ({"exp": NOW + 3600, "iat": NOW}, "ok"),  # exactly the maximum
        ({"exp": NOW + 3601, "iat": NOW}, "jwt_svid_lifetime_too_long"),
        ({"exp": NOW + 3601}, "jwt_svid_lifetime_too_long"),  # no iat: counted from now
        ({"exp": NOW + 4000, "nbf": NOW + 500}, "jwt_svid_not_yet_valid"),
        ({"exp": NOW + 100, "iat": NOW + 10}, "ok"),
        ({"exp": NOW + 5, "iat": NOW + 20}, "jwt_svid_expired"),  # expires before it is issued
    ],
)
def test_the_default_leeway_and_lifetime(times: dict[str, int], outcome: str) -> None:
    assert _outcome(JwtSvidVerifier(BUNDLES, [AUD]), _token(**times)) == outcome


@pytest.mark.parametrize("value", ["1800000000", True, None, [1], 1e400])
def test_iat_must_be_a_numeric_date(value: object) -> None:
    token = jwt.encode(
        {"sub": SUB, "aud": AUD, "exp": NOW + 60, "iat": value}, KEY, algorithm="ES256", headers={"kid": "k"}
    )
    assert _outcome(JwtSvidVerifier(BUNDLES, [AUD]), token) in ("jwt_svid_malformed",)


def test_time_is_checked_after_the_signature() -> None:
    """A forged token far in the future is a bad signature, not a time error (nothing about it is trusted)."""
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": SUB, "aud": AUD, "exp": NOW + 10**6, "iat": NOW + 10**5}, other, algorithm="ES256",
                       headers={"kid": "k"})  # fmt: skip
    assert _outcome(JwtSvidVerifier(BUNDLES, [AUD]), token) == "jwt_svid_bad_signature"


@pytest.mark.parametrize(("leeway", "max_lifetime"), [(-1.0, 60.0), (301.0, 60.0), (0.0, 0.0)])
def test_bounds_of_the_verifier(leeway: float, max_lifetime: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        JwtSvidVerifier(BUNDLES, [AUD], leeway=leeway, max_lifetime=max_lifetime)
