"""Signing keys, JWKS and key loading errors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.errors import KeyLoadError
from sidecar.tokens.keys import KeySet, generate_private_key_pem, load_signing_key, thumbprint


def test_es256_key_and_jwk() -> None:
    key = load_signing_key(generate_private_key_pem("ES256"), "ES256", file="f", field="k")
    jwk = key.public_jwk
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256" and jwk["use"] == "sig"
    assert "d" not in jwk
    assert key.kid == thumbprint(jwk) == jwk["kid"]
    assert "private" not in repr(key).lower() or "private_key" not in repr(key)


def test_rfc7638_thumbprint_example() -> None:
    # RFC 7638 §3.1 example key (RSA) is not supported; use the EC canonical-member rule on a known JWK
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        "kid": "ignored",
        "use": "sig",
    }
    assert thumbprint(jwk) == thumbprint({k: jwk[k] for k in ("crv", "kty", "x", "y")})
    assert len(thumbprint(jwk)) == 43


def test_eddsa_key() -> None:
    key = load_signing_key(generate_private_key_pem("EdDSA"), "EdDSA", file="f", field="k")
    assert key.public_jwk["kty"] == "OKP" and key.public_jwk["crv"] == "Ed25519"


@pytest.mark.parametrize(
    ("pem", "algorithm", "why"),
    [
        (b"not a key", "ES256", "not an unencrypted PEM"),
        (generate_private_key_pem("EdDSA"), "ES256", "EC P-256"),
        (generate_private_key_pem("ES256"), "EdDSA", "Ed25519"),
        (
            ec.generate_private_key(ec.SECP384R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "ES256",
            "EC P-256",
        ),
        (
            rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "ES256",
            "not an unencrypted PEM",
        ),
    ],
)
def test_bad_keys(pem: bytes, algorithm: str, why: str) -> None:
    with pytest.raises(KeyLoadError, match=why) as info:
        load_signing_key(pem, algorithm, file="sidecar.yaml", field="issuer.signing_key")  # type: ignore[arg-type]
    assert info.value.field == "issuer.signing_key"


def test_jwks_lists_current_next_and_unexpired_retired() -> None:
    a, b, c, d = (load_signing_key(generate_private_key_pem(), "ES256", file="f", field="k") for _ in range(4))
    keys = KeySet(current=a, next=b, retired=(c.retire(100.0), d.retire(10.0), a.retire(100.0)))
    assert [k["kid"] for k in keys.jwks(now=50.0)["keys"]] == [a.kid, b.kid, c.kid]
