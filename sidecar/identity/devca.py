"""A development trust domain: a self-signed CA that issues X.509-SVIDs and JWT-SVIDs.

For local use and tests only (``agent-authz dev-ca``); production identities come from SPIRE. The
certificates follow the X509-SVID profile: the CA has ``CA:TRUE`` and ``keyCertSign``/``cRLSign``;
leaves have exactly one URI SAN (the SPIFFE ID), ``CA:FALSE``, ``digitalSignature`` (and
``keyEncipherment`` for RSA-less TLS compatibility is not needed: keys are EC P-256), and the
``serverAuth``/``clientAuth`` extended key usages (X509-SVID §4).

Layout of a CA directory::

    bundle.pem        X.509 trust bundle (the CA certificate)
    ca.key            the CA private key (0600)
    jwt-bundle.json   JWT trust bundle: a JWKS (SPIFFE Trust Domain and Bundle §4)
    jwt-ca.key        the JWT-SVID signing key (0600)
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.errors import ConfigError
from sidecar.identity.spiffe_id import parse_spiffe_id
from sidecar.tokens.keys import thumbprint

__all__ = ["DevCA", "IssuedSvid"]

_PEM = serialization.Encoding.PEM


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)  # atomic: watchers (Envoy SDS, the sidecar) never see half a file


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class IssuedSvid:
    """Paths of an issued X.509-SVID (and JWT-SVID, when asked for)."""

    cert: Path
    key: Path
    jwt: Path | None = None


class DevCA:
    """A development CA for one trust domain.

    Args:
        trust_domain: e.g. ``example.org``.
        ca_key / ca_cert: the X.509 CA.
        jwt_key: the JWT-SVID signing key.
    """

    def __init__(
        self,
        trust_domain: str,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        jwt_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.trust_domain = trust_domain
        self.ca_key = ca_key
        self.ca_cert = ca_cert
        self.jwt_key = jwt_key

    # -- creation and persistence -------------------------------------------------------------
    @classmethod
    def create(cls, trust_domain: str, *, ttl: dt.timedelta = dt.timedelta(days=30)) -> DevCA:
        """A new CA for ``trust_domain`` (validated as the trust domain of a SPIFFE ID)."""
        parse_spiffe_id(f"spiffe://{trust_domain}", require_path=False)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agent-authz dev CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, trust_domain),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))  # tolerate clock skew between machines
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert, ec.generate_private_key(ec.SECP256R1()))

    def save(self, directory: Path) -> None:
        """Write ``bundle.pem``, ``ca.key``, ``jwt-bundle.json`` and ``jwt-ca.key`` into ``directory``."""
        _write(directory / "bundle.pem", self.ca_cert.public_bytes(_PEM))
        _write(directory / "ca.key", _key_pem(self.ca_key), 0o600)
        _write(directory / "jwt-bundle.json", json.dumps(self.jwt_bundle(), indent=2).encode())
        _write(directory / "jwt-ca.key", _key_pem(self.jwt_key), 0o600)

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        """Load a CA written by :meth:`save`.

        Raises:
            ConfigError: files missing or not a dev CA.
        """
        try:
            cert = x509.load_pem_x509_certificate((directory / "bundle.pem").read_bytes())
            ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            jwt_key = serialization.load_pem_private_key((directory / "jwt-ca.key").read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(str(directory), "", f"not a dev CA directory ({exc})") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(jwt_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(str(directory), "", "dev CA keys must be EC keys")
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        trust_domain = uris.get_values_for_type(x509.UniformResourceIdentifier)[0].removeprefix("spiffe://")
        return cls(trust_domain, ca_key, cert, jwt_key)

    # -- bundles -------------------------------------------------------------------------------
    @property
    def jwt_kid(self) -> str:
        """``kid`` of the JWT-SVID signing key (RFC 7638 thumbprint)."""
        return thumbprint(self._public_jwk())

    def _public_jwk(self) -> dict[str, str]:
        from jwt.algorithms import ECAlgorithm

        jwk: dict[str, str] = ECAlgorithm.to_jwk(self.jwt_key.public_key(), as_dict=True)
        return jwk

    def jwt_bundle(self) -> dict[str, object]:
        """The JWT bundle as a JWKS with ``use: jwt-svid`` (SPIFFE bundle format)."""
        return {"keys": [{**self._public_jwk(), "kid": self.jwt_kid, "use": "jwt-svid"}]}

    # -- issuing -------------------------------------------------------------------------------
    def issue_x509(
        self, spiffe_id: str, *, ttl: dt.timedelta = dt.timedelta(hours=1)
    ) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
        """Issue an X.509-SVID for ``spiffe_id`` (must be in this trust domain).

        Returns:
            ``(chain, key)`` with the chain leaf first.

        Raises:
            SpiffeIdError: ``spiffe_id`` is invalid.
            ValueError: the ID belongs to another trust domain.
        """
        parsed = parse_spiffe_id(spiffe_id)
        if str(parsed.trust_domain) != self.trust_domain:
            raise ValueError(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agent-authz dev SVID")]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(min(now + ttl, self.ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return [cert], key

    def issue_jwt(self, spiffe_id: str, audience: list[str], *, ttl: dt.timedelta = dt.timedelta(minutes=5)) -> str:
        """Issue a JWT-SVID (ES256; headers ``alg``, ``kid``, ``typ``; claims ``sub``, ``aud``, ``exp``, ``iat``)."""
        parse_spiffe_id(spiffe_id)
        now = int(dt.datetime.now(dt.UTC).timestamp())
        claims = {"sub": spiffe_id, "aud": audience, "exp": now + int(ttl.total_seconds()), "iat": now}
        return jwt.encode(claims, self.jwt_key, algorithm="ES256", headers={"kid": self.jwt_kid, "typ": "JWT"})

    def write_svid(
        self,
        spiffe_id: str,
        out: Path,
        *,
        name: str | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        jwt_audience: list[str] | None = None,
    ) -> IssuedSvid:
        """Issue and write ``NAME.pem`` (chain), ``NAME.key`` and, with ``jwt_audience``, ``NAME.jwt``.

        ``NAME`` defaults to the last path segment of the SPIFFE ID.
        """
        chain, key = self.issue_x509(spiffe_id, ttl=ttl)
        name = name or spiffe_id.rstrip("/").rsplit("/", 1)[-1]
        cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, b"".join(c.public_bytes(_PEM) for c in chain))
        jwt_path = None
        if jwt_audience:
            jwt_path = out / f"{name}.jwt"
            _write(
                jwt_path, self.issue_jwt(spiffe_id, jwt_audience, ttl=min(ttl, dt.timedelta(hours=1))).encode(), 0o600
            )
        return IssuedSvid(cert_path, key_path, jwt_path)
