"""Verify JWT-SVIDs presented as ``Authorization: Bearer`` on ingress (JWT-SVID §2, §3).

* header: only ``alg``, ``kid`` and ``typ`` (JWT-SVID §2; anything else, ``crit`` included, is
  rejected); ``alg`` one of RS/ES/PS 256/384/512 (§2.1: never ``none`` or ``HS*``); ``kid``
  required; ``typ``, when present, ``JWT`` or ``JOSE``;
* claims: ``sub`` a strict SPIFFE ID with a path, ``aud`` required (a non-empty string or list of
  them) and one of the accepted audiences (a list is accepted when one member matches, as
  go-spiffe does), ``exp`` a NumericDate in the future (§3; RFC 7519 §2);
* time claims, after the signature, each with the same small bounded leeway (JWT-SVID §3 asks
  validators for one; RFC 7519 §4.1.4-§4.1.6): ``exp`` not passed (now < ``exp`` + leeway),
  ``nbf`` (optional) reached (``nbf`` - leeway <= now), ``iat`` (optional) not in the future
  (``iat`` <= now + leeway), and the lifetime ``exp`` - ``iat`` (without ``iat``: from ``nbf``,
  else from now) not over the configured maximum (a negative one is expired);
* key: chosen by ``kid`` from the JWT bundle of the ``sub``'s trust domain only, and of the type
  ``alg`` needs (RSA for RS*/PS*, the matching NIST curve for ES*): a ``kid`` naming a key of another
  type is a signature failure, never an exception.

Keys are ``cryptography`` objects loaded with the bundle; nothing is parsed per call but the token.
Every failure raises :class:`~sidecar.errors.IdentityError` with a ``jwt_svid_*`` detail code; PyJWT
and ``cryptography`` exceptions are mapped here and never escape.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.errors import IdentityError, SpiffeIdError, SvidDetail
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "MAX_LEEWAY",
    "JwtSvidVerifier",
    "VerifiedJwtSvid",
    "key_mismatch",
    "looks_like_jwt",
]

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"})
_ALLOWED_HEADERS = frozenset({"alg", "kid", "typ"})
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}  # RFC 7518 §3.4
_MAX_TOKEN = 16 * 1024
DEFAULT_LEEWAY = 30.0
"""Seconds of clock skew accepted on ``exp``, ``nbf`` and ``iat`` (``ingress.jwt_svid_leeway``)."""
MAX_LEEWAY = 300.0
"""The largest leeway a configuration may set: "small" (JWT-SVID §3)."""
DEFAULT_MAX_LIFETIME = 3600.0
"""Longest accepted lifetime in seconds (``ingress.jwt_svid_max_lifetime``); SPIRE mints JWT-SVIDs
for 5 minutes by default."""


@dataclass(frozen=True, slots=True)
class VerifiedJwtSvid:
    """A verified JWT-SVID: its subject, trust domain and expiry (POSIX seconds)."""

    spiffe_id: str
    trust_domain: str
    exp: int


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has the compact JWS shape (three base64url parts)."""
    return token.count(".") == 2


def _b64json(part: str) -> Any:
    padded = part + "=" * (-len(part) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _numeric_date(value: object) -> bool:
    """RFC 7519 §2 NumericDate: a finite JSON number (``true`` is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _audiences_well_formed(aud: object) -> bool:
    """``aud`` is a non-empty string or a non-empty list of them (JWT-SVID §3.2; RFC 7519 §4.1.3)."""
    values = [aud] if isinstance(aud, str) else aud
    return isinstance(values, list) and bool(values) and all(isinstance(a, str) and a for a in values)


def key_mismatch(alg: str, key: PublicKeyTypes) -> str | None:
    """Why ``key`` cannot verify an ``alg`` signature (RFC 7518 §3.3-§3.5), or ``None`` when it can."""
    if alg.startswith(("RS", "PS")):
        if isinstance(key, rsa.RSAPublicKey):
            return None
        return f"alg {alg} needs an RSA key; the kid names a {type(key).__name__}"
    curve = _EC_CURVES.get(alg)
    if curve is not None and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve:
        return None
    found = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
    return f"alg {alg} needs a {curve} EC key; the kid names a {found} key"


class JwtSvidVerifier:
    """Verifies JWT-SVIDs against per-trust-domain JWT bundles.

    Args:
        bundles: the trust bundles.
        audiences: accepted ``aud`` values (normally this agent's SPIFFE ID).
        leeway: seconds of clock skew accepted on ``exp``, ``nbf`` and ``iat`` (0 - 300).
        max_lifetime: longest accepted ``exp`` - ``iat`` in seconds.

    Raises:
        ValueError: ``leeway`` outside 0 - 300 s, or ``max_lifetime`` not positive.
    """

    def __init__(
        self,
        bundles: TrustBundles,
        audiences: Iterable[str],
        *,
        leeway: float = DEFAULT_LEEWAY,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY or not max_lifetime > 0:
            raise ValueError("leeway must be 0-300 s and max_lifetime positive")
        self.bundles = bundles
        self.audiences = list(audiences)
        self.leeway = leeway
        self.max_lifetime = max_lifetime

    def verify(self, token: str, *, now: float) -> VerifiedJwtSvid:
        """Verify ``token``.

        Args:
            token: the compact JWS.
            now: POSIX seconds.

        Raises:
            IdentityError: detail ``jwt_svid_malformed``, ``jwt_svid_bad_header``, ``jwt_svid_bad_algorithm``,
                ``jwt_svid_invalid_subject``, ``jwt_svid_unknown_trust_domain``, ``jwt_svid_unknown_key``,
                ``jwt_svid_bad_signature``, ``jwt_svid_missing_claim``, ``jwt_svid_bad_audience``,
                ``jwt_svid_expired``, ``jwt_svid_not_yet_valid``, ``jwt_svid_issued_in_future``,
                ``jwt_svid_lifetime_too_long``.
        """
        if len(token) > _MAX_TOKEN or not looks_like_jwt(token):
            raise IdentityError(SvidDetail.JWT_SVID_MALFORMED, "not a compact JWS")
        head, body, _ = token.split(".")
        try:
            header = _b64json(head)
            claims = _b64json(body)
        except (ValueError, UnicodeError):
            raise IdentityError(SvidDetail.JWT_SVID_MALFORMED, "header or payload is not base64url JSON") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise IdentityError(SvidDetail.JWT_SVID_MALFORMED, "header and payload must be JSON objects")
        extra = set(header) - _ALLOWED_HEADERS
        if extra:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_HEADER, f"header parameters not allowed: {sorted(extra)}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_ALGORITHM, f"alg {alg!r} is not allowed")
        if header.get("typ") not in (None, "JWT", "JOSE"):
            raise IdentityError(SvidDetail.JWT_SVID_BAD_HEADER, "typ must be JWT or JOSE")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_HEADER, "kid is required")
        for claim in ("sub", "aud", "exp"):
            if claims.get(claim) in (None, "", []):
                raise IdentityError(SvidDetail.JWT_SVID_MISSING_CLAIM, f"claim {claim!r} is required")
        if not _audiences_well_formed(claims["aud"]):
            raise IdentityError(SvidDetail.JWT_SVID_BAD_AUDIENCE, "aud must be a non-empty string or a list of them")
        if not all(_numeric_date(claims[name]) for name in ("exp", "nbf", "iat") if name in claims):
            raise IdentityError(SvidDetail.JWT_SVID_MALFORMED, "exp, nbf and iat must be NumericDates (RFC 7519 §2)")
        sub = claims["sub"]
        try:
            spiffe_id = parse_spiffe_id(sub) if isinstance(sub, str) else parse_spiffe_id("")
        except SpiffeIdError as exc:
            raise IdentityError(SvidDetail.JWT_SVID_INVALID_SUBJECT, str(exc)) from None
        trust_domain = str(spiffe_id.trust_domain)
        keys = self.bundles.jwt.get(trust_domain)
        if keys is None:
            raise IdentityError(SvidDetail.JWT_SVID_UNKNOWN_TRUST_DOMAIN, f"no JWT bundle for {trust_domain}")
        key = keys.get(kid)
        if key is None:
            raise IdentityError(SvidDetail.JWT_SVID_UNKNOWN_KEY, f"kid {kid!r} is not in the {trust_domain} JWT bundle")
        if not self.audiences:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_AUDIENCE, "this verifier accepts no audience")
        mismatch = key_mismatch(alg, key)
        if mismatch is not None:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_SIGNATURE, mismatch)
        try:
            verified = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=[alg],
                audience=self.audiences,
                # time claims are checked below against ``now``, not the wall clock
                options={
                    "require": ["sub", "aud", "exp"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise IdentityError(SvidDetail.JWT_SVID_BAD_AUDIENCE, "aud does not name this agent") from None
        except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
            raise IdentityError(SvidDetail.JWT_SVID_BAD_SIGNATURE, "signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise IdentityError(SvidDetail.JWT_SVID_MALFORMED, str(exc)) from None
        except (TypeError, ValueError, OverflowError) as exc:  # the boundary: nothing third-party escapes
            raise IdentityError(
                SvidDetail.JWT_SVID_MALFORMED, f"the token cannot be verified ({type(exc).__name__})"
            ) from None
        self._check_times(verified, now)
        return VerifiedJwtSvid(str(spiffe_id), trust_domain, int(verified["exp"]))

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        """``exp``, ``nbf``, ``iat`` and the lifetime (NumericDates, checked as such above)."""
        leeway = self.leeway
        exp = claims["exp"]
        if now >= exp + leeway:
            raise IdentityError(SvidDetail.JWT_SVID_EXPIRED, "the token has expired")
        nbf, iat = claims.get("nbf"), claims.get("iat")
        if nbf is not None and now + leeway < nbf:
            raise IdentityError(SvidDetail.JWT_SVID_NOT_YET_VALID, "the token is not valid yet (nbf)")
        if iat is not None and iat > now + leeway:
            raise IdentityError(SvidDetail.JWT_SVID_ISSUED_IN_FUTURE, "the token was issued in the future (iat)")
        start = iat if iat is not None else nbf if nbf is not None else now
        lifetime = exp - start
        if lifetime < 0:
            raise IdentityError(SvidDetail.JWT_SVID_EXPIRED, "the token expires before it is valid (exp < iat or nbf)")
        if lifetime > self.max_lifetime:
            raise IdentityError(
                SvidDetail.JWT_SVID_LIFETIME_TOO_LONG,
                f"the token is valid for {lifetime:.0f}s; at most {self.max_lifetime:.0f}s is accepted",
            )
