"""Fixture generators for the SPIFFE conformance suite: certificates, keys, bundles and tokens.

Every fixture the upstream suites (go-spiffe, py-spiffe) keep as files in ``testdata`` is rebuilt
here at test time with ``cryptography`` and PyJWT - nothing is copied, no key is committed. Each
builder makes exactly the property a case needs (a leaf with ``CA:TRUE``, a signer without
``keyCertSign``, a JWK without ``kid``, a token whose ``kid`` names a key of another type...).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER

_KEYS: dict[str, PrivateKeyTypes] = {}


def new_key(kind: str = "ec-p256") -> PrivateKeyTypes:
    """A fresh private key: ``ec-p256``, ``ec-p384``, ``ec-p521``, ``ec-k256``, ``rsa-2048``, ``ed25519``."""
    if kind.startswith("ec-"):
        curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1(), "k256": ec.SECP256K1()}
        return ec.generate_private_key(curve[kind[3:]])
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def cached_key(kind: str) -> PrivateKeyTypes:
    """One key per kind for the whole run (RSA generation is slow; identity does not matter)."""
    if kind not in _KEYS:
        _KEYS[kind] = new_key(kind)
    return _KEYS[kind]


def _sign_hash(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def key_usage(
    *,
    digital_signature: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class Authority:
    """A CA (root or intermediate) that signs further certificates."""

    cert: x509.Certificate
    key: PrivateKeyTypes

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(PEM)


def make_ca(
    trust_domain: str,
    *,
    key: str = "ec-p256",
    signer: Authority | None = None,
    ca: bool = True,
    basic_constraints: bool = True,
    usage: x509.KeyUsage | bool | None = None,
    name: str | None = None,
    not_after: dt.datetime | None = None,
) -> Authority:
    """A CA for ``trust_domain``: self-signed, or an intermediate signed by ``signer``.

    ``ca`` / ``basic_constraints`` / ``usage`` break X509-SVID §4.1/§4.3 on purpose when asked to
    (``usage=False``: no keyUsage extension at all).
    """
    private = new_key(key)
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conformance"),
            x509.NameAttribute(NameOID.COMMON_NAME, name or f"{trust_domain} {'intermediate' if signer else 'root'}"),
        ]
    )
    issuer_name = signer.cert.subject if signer else subject
    issuer_key = signer.key if signer else private
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(private.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)  # type: ignore[arg-type]
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False
        )
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if usage is not False:
        ku = usage if isinstance(usage, x509.KeyUsage) else key_usage(key_cert_sign=True, crl_sign=True)
        builder = builder.add_extension(ku, critical=True)
    if signer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    cert = builder.sign(issuer_key, _sign_hash(issuer_key))  # type: ignore[arg-type]
    return Authority(cert, private)


def make_leaf(
    signer: Authority,
    uris: Sequence[str],
    *,
    key: str | PrivateKeyTypes = "ec-p256",
    dns: Sequence[str] = (),
    ca: bool = False,
    basic_constraints: bool = True,
    usage: x509.KeyUsage | bool | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    self_signed: bool = False,
) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """An X.509-SVID leaf with exactly the properties asked for (``usage=False``: no keyUsage)."""
    private = new_key(key) if isinstance(key, str) else key
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conformance SVID")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else signer.cert.subject)
        .public_key(private.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if usage is not False:
        builder = builder.add_extension(
            usage if isinstance(usage, x509.KeyUsage) else key_usage(digital_signature=True), critical=True
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if not self_signed:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    sign_key = private if self_signed else signer.key
    return builder.sign(sign_key, _sign_hash(sign_key)), private  # type: ignore[arg-type]


# -- encodings --------------------------------------------------------------------------------------
def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)


def der(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(DER) for c in certs)


def key_pem(key: PrivateKeyTypes, *, traditional: bool = False) -> bytes:
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
    return key.private_bytes(PEM, fmt, serialization.NoEncryption())


def key_der(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def corrupt_pem(data: bytes) -> bytes:
    """Valid PEM framing around base64 that does not decode to the structure it claims."""
    lines = data.decode().splitlines()
    body = "".join(lines[1:-1])
    broken = base64.b64encode(b"\x30\x82\x01\x00" + b"\x00" * 16 + base64.b64decode(body)[40:80]).decode()
    return f"{lines[0]}\n{broken}\n{lines[-1]}\n".encode()


# -- JWKs and bundles ---------------------------------------------------------------------------------
def public_jwk(key: PrivateKeyTypes | PublicKeyTypes, **members: Any) -> dict[str, Any]:
    """The public JWK of ``key`` (RFC 7517/7518) plus ``members`` (``kid``, ``use``, ...); ``None`` drops one."""
    public = key.public_key() if hasattr(key, "private_bytes") else key  # type: ignore[union-attr]
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
    else:
        raise TypeError(type(public).__name__)
    jwk.update(members)
    return {k: v for k, v in jwk.items() if v is not None}


def x509_jwk(*certs: x509.Certificate, **members: Any) -> dict[str, Any]:
    """An ``x509-svid`` JWK (X509-SVID §6.1): the first certificate's key, ``x5c`` with ``certs``."""
    jwk = public_jwk(certs[0].public_key(), use="x509-svid")
    jwk["x5c"] = [base64.b64encode(c.public_bytes(DER)).decode() for c in certs]
    jwk.update(members)
    return {k: v for k, v in jwk.items() if v is not None}


def document(keys: list[dict[str, Any]] | None, **members: Any) -> bytes:
    """A bundle document (``keys=None`` leaves the member out)."""
    body: dict[str, Any] = dict(members)
    if keys is not None:
        body["keys"] = keys
    return json.dumps(body, indent=2).encode()


# -- JWS / JWT-SVIDs ----------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jws(
    header: Mapping[str, Any], claims: Mapping[str, Any], key: PrivateKeyTypes | None, sign_alg: str | None = None
) -> str:
    """A compact JWS with exactly ``header`` (no member added) and ``claims``.

    The signature is computed with ``sign_alg`` (default: the header's ``alg``) and ``key`` through
    PyJWT's algorithm objects; with ``key=None`` it is 64 zero bytes.
    """
    signing_input = f"{b64url(json.dumps(dict(header)).encode())}.{b64url(json.dumps(dict(claims)).encode())}"
    if key is None:
        signature = bytes(64)
    else:
        algorithm = get_default_algorithms()[sign_alg or str(header["alg"])]
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))  # type: ignore[arg-type]
    return f"{signing_input}.{b64url(signature)}"


def claims(sub: str | None, aud: Any = ("audience",), *, exp: Any = "in 1h", **extra: Any) -> dict[str, Any]:
    """JWT-SVID claims; ``exp`` ``"in 1h"`` / ``"1m ago"`` are relative to now, ``None`` leaves a claim out."""
    now = int(time.time())
    if exp == "in 1h":
        exp = now + 3600
    elif exp == "1m ago":
        exp = now - 60
    body: dict[str, Any] = {"sub": sub, "aud": list(aud) if isinstance(aud, tuple) else aud, "exp": exp, **extra}
    return {k: v for k, v in body.items() if v is not None}


ALG_FOR_KEY = {"ec-p256": "ES256", "ec-p384": "ES384", "ec-p521": "ES512", "rsa-2048": "RS256"}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
