"""Compact JWS for grants and revocation lists: sign with a key or an X.509-SVID, verify either.

Only asymmetric algorithms are accepted (``ES256``, ``ES384``, ``EdDSA``, ``RS256``, ``PS256``);
``none`` and ``HS*`` never verify. With ``x5c`` (RFC 7515 §4.1.6) the leaf must be a valid
X.509-SVID chaining to the bundle of its own trust domain; the signer is its SPIFFE ID. With
``kid`` the key must be a configured root issuer key; the signer is ``key:<kid>``. ``crit``
(RFC 7515 §4.1.11) is refused: we understand no extensions. The key must be of the type ``alg``
needs (RFC 7518 §3.3-§3.5, RFC 8037 §3.1): a ``kid`` or ``x5c`` leaf naming a key of another type
(or curve) is ``grant_bad_signature``; PyJWT and ``cryptography`` exceptions never escape.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from sidecar.errors import IdentityError
from sidecar.grants.model import GrantCode, GrantError
from sidecar.identity.x509svid import X509SvidVerifier

__all__ = ["ALGORITHMS", "algorithm_for", "sign", "unverified", "verify"]

ALGORITHMS = frozenset({"ES256", "ES384", "EdDSA", "RS256", "PS256"})
_ALLOWED_HEADERS = frozenset({"alg", "typ", "kid", "x5c"})
_MAX_TOKEN = 256 * 1024
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}  # RFC 7518 §3.4


def algorithm_for(key: PrivateKeyTypes) -> str:
    """The JWS ``alg`` for a private key (EC P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA, RSA → PS256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES384" if isinstance(key.curve, ec.SECP384R1) else "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    return "PS256"


def sign(
    payload: Mapping[str, Any],
    key: PrivateKeyTypes,
    *,
    typ: str,
    kid: str | None = None,
    x5c: list[x509.Certificate] | None = None,
) -> str:
    """Sign ``payload`` as a compact JWS with exactly one of ``kid`` or ``x5c`` (leaf first)."""
    if (kid is None) == (x5c is None):
        raise ValueError("give exactly one of kid or x5c")
    headers: dict[str, Any] = {"typ": typ}
    if kid is not None:
        headers["kid"] = kid
    else:
        assert x5c is not None
        headers["x5c"] = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in x5c]
    return jwt.encode(dict(payload), key, algorithm=algorithm_for(key), headers=headers)  # type: ignore[arg-type]


def _key_mismatch(alg: str, key: PublicKeyTypes) -> str | None:
    """Why ``key`` cannot verify an ``alg`` signature, or ``None`` when it can."""
    if alg in ("RS256", "PS256"):
        fits = isinstance(key, rsa.RSAPublicKey)
        needed = "an RSA key"
    elif alg == "EdDSA":
        fits = isinstance(key, ed25519.Ed25519PublicKey)
        needed = "an Ed25519 key"
    else:
        curve = _EC_CURVES[alg]
        fits = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
        needed = f"a {curve} EC key"
    if fits:
        return None
    found = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
    return f"alg {alg} needs {needed}; the signer's key is {found}"


def _checked_header(token: str, typ: str) -> dict[str, Any]:
    if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 2:
        raise GrantError(GrantCode.MALFORMED, "not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise GrantError(GrantCode.MALFORMED, str(exc)) from None
    if header.get("typ") != typ:
        raise GrantError(GrantCode.BAD_HEADER, f"typ must be {typ!r}")
    extra = set(header) - _ALLOWED_HEADERS
    if extra:
        raise GrantError(GrantCode.BAD_HEADER, f"header parameters not allowed: {sorted(extra)}")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise GrantError(GrantCode.BAD_HEADER, f"alg {alg!r} is not allowed")
    return header


def unverified(token: str, *, typ: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS of type ``typ``, WITHOUT verifying the signature.

    For structural checks where the trust bundles are not at hand (the injection webhook checks a
    task annotation's shape; the sidecar verifies the signature). The header passes the same checks
    as in :func:`verify` (``typ``, allowed parameters and ``alg``), and names a ``kid`` or an ``x5c``.

    Raises:
        GrantError: ``grant_malformed`` or ``grant_bad_header``.
    """
    header = _checked_header(token, typ)
    if not isinstance(header.get("kid"), str) and not isinstance(header.get("x5c"), list):
        raise GrantError(GrantCode.BAD_HEADER, "a kid or an x5c chain is required")
    try:
        payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise GrantError(GrantCode.MALFORMED, str(exc)) from None
    return header, payload


def verify(
    token: str,
    *,
    typ: str,
    root_keys: Mapping[str, PublicKeyTypes],
    svids: X509SvidVerifier | None,
    now: float,
) -> tuple[str, dict[str, Any]]:
    """Verify a compact JWS of type ``typ``.

    Returns:
        ``(signer, payload)``: ``signer`` is the SPIFFE ID of the ``x5c`` leaf or ``key:<kid>``.

    Raises:
        GrantError: ``grant_malformed``, ``grant_bad_header``, ``grant_untrusted_signer`` or
            ``grant_bad_signature`` (also for a key of another type or curve than ``alg`` needs).
    """
    header = _checked_header(token, typ)
    alg = header["alg"]
    key: PublicKeyTypes
    if "x5c" in header:
        if svids is None:
            raise GrantError(GrantCode.UNTRUSTED_SIGNER, "x5c signatures need trust bundles (an identity source)")
        chain = header["x5c"]
        if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain) or len(chain) > 8:
            raise GrantError(GrantCode.BAD_HEADER, "x5c must be a list of base64 DER certificates")
        try:
            certs = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in chain]
        except ValueError as exc:
            raise GrantError(GrantCode.BAD_HEADER, f"x5c does not parse ({exc})") from None
        try:
            verified = svids.verify_certificates(certs[0], certs[1:], now=now)
        except IdentityError as exc:
            raise GrantError(GrantCode.UNTRUSTED_SIGNER, str(exc)) from None
        signer, key = verified.spiffe_id, certs[0].public_key()
    elif isinstance(header.get("kid"), str):
        found = root_keys.get(header["kid"])
        if found is None:
            raise GrantError(GrantCode.UNTRUSTED_SIGNER, f"kid {header['kid']!r} is not a root issuer key")
        signer, key = f"key:{header['kid']}", found
    else:
        raise GrantError(GrantCode.BAD_HEADER, "a kid or an x5c chain is required")
    mismatch = _key_mismatch(alg, key)
    if mismatch is not None:
        raise GrantError(GrantCode.BAD_SIGNATURE, mismatch)
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,  # type: ignore[arg-type]
            algorithms=[alg],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
        raise GrantError(GrantCode.BAD_SIGNATURE, "the signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise GrantError(GrantCode.MALFORMED, str(exc)) from None
    except (TypeError, ValueError, OverflowError) as exc:  # the boundary: nothing third-party escapes
        raise GrantError(GrantCode.BAD_SIGNATURE, f"the signature cannot be verified ({type(exc).__name__})") from None
    return signer, payload
