"""Signing keys for task-scoped tokens and their public JWKS.

Keys are parsed once at load into ``cryptography`` key objects: passing PEM bytes to pyjwt per call
re-parses the key each time (~30 ms measured here) and must never happen on the request path.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from sidecar.errors import KeyLoadError

__all__ = [
    "Algorithm",
    "KeySet",
    "RetiredKey",
    "SigningKey",
    "generate_private_key_pem",
    "load_signing_key",
    "thumbprint",
]

Algorithm = Literal["ES256", "EdDSA"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), used as ``kid``."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("crv", "kty", "x")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private signing key and its public JWK.

    Attributes:
        kid: RFC 7638 thumbprint of the public key.
        algorithm: JWS ``alg``.
        private_key: the ``cryptography`` key object (not in ``repr``).
        public_jwk: public JWK with ``kid``, ``alg`` and ``use``.
    """

    kid: str
    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False)
    public_jwk: dict[str, Any] = field(compare=False)

    def retire(self, until: float) -> RetiredKey:
        """This key's public half, published until ``until`` (POSIX seconds) once it stops signing."""
        return RetiredKey(self.kid, dict(self.public_jwk), until)


@dataclass(frozen=True, slots=True)
class RetiredKey:
    """A key that no longer signs, published so that the tokens it signed still verify (plain data:
    no private key).

    Attributes:
        kid: its RFC 7638 thumbprint.
        public_jwk: the public JWK as published.
        until: POSIX seconds after which it leaves the JWKS (its last token has expired by then).
    """

    kid: str
    public_jwk: dict[str, Any] = field(compare=False)
    until: float = 0.0


def load_signing_key(pem: bytes, algorithm: Algorithm, *, file: str, field: str) -> SigningKey:
    """Parse a PEM private key (PKCS#8 or traditional, unencrypted).

    Args:
        pem: the key file's bytes.
        algorithm: ``ES256`` needs an EC P-256 key; ``EdDSA`` an Ed25519 key.
        file / field: where the key was named, for error messages.

    Raises:
        KeyLoadError: not a PEM private key, encrypted, or of the wrong type for ``algorithm``.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyLoadError(file, field, f"not an unencrypted PEM private key ({exc})") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd key types
        raise KeyLoadError(file, field, f"unsupported private key ({type(exc).__name__})") from None
    if algorithm == "ES256":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise KeyLoadError(file, field, "ES256 needs an EC P-256 private key")
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyLoadError(file, field, "EdDSA needs an Ed25519 private key")
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    kid = thumbprint(jwk)
    public = {**jwk, "kid": kid, "alg": algorithm, "use": "sig"}
    # Self-test once at load: sign and verify a probe (also warms pyjwt's code paths).
    try:
        probe = jwt.encode({"probe": kid}, key, algorithm=algorithm)
        jwt.decode(probe, key.public_key(), algorithms=[algorithm])
    except jwt.PyJWTError as exc:  # pragma: no cover - a loaded key of the right type always signs
        raise KeyLoadError(file, field, f"key cannot sign ({exc})") from None
    return SigningKey(kid=kid, algorithm=algorithm, private_key=key, public_jwk=public)


def generate_private_key_pem(algorithm: Algorithm = "ES256") -> bytes:
    """A fresh unencrypted PKCS#8 PEM private key for ``algorithm`` (used by the demo and tests)."""
    key: PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys a snapshot signs with and publishes.

    Attributes:
        current: signs new tokens.
        next: published ahead of rotation so verifiers already know it.
        retired: earlier ``current`` keys, published until their ``until`` (POSIX seconds) so tokens
            they signed still verify.
    """

    current: SigningKey
    next: SigningKey | None = None
    retired: tuple[RetiredKey, ...] = ()

    def jwks(self, now: float) -> dict[str, list[dict[str, Any]]]:
        """The JWKS document (RFC 7517 §5): current, next, then unexpired retired keys."""
        keys = [self.current.public_jwk]
        seen = {self.current.kid}
        candidates: list[SigningKey | RetiredKey] = [self.next] if self.next is not None else []
        candidates += [key for key in self.retired if key.until > now]
        for key in candidates:
            if key.kid not in seen:
                keys.append(key.public_jwk)
                seen.add(key.kid)
        return {"keys": keys}
