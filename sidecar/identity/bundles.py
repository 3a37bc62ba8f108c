"""Trust bundles, one per trust domain (SPIFFE Trust Domain and Bundle; SPIFFE Federation).

Verification always uses the bundle of the trust domain named in the SPIFFE ID being verified,
never a pooled store: a CA of ``partner.example`` can never vouch for an ID in ``example.org``.

Two formats are read here, and only here:

* :func:`parse_x509_bundle_pem` - X.509 authorities as PEM certificates (the ``bundles`` files,
  which Envoy's SPIFFE validator reads too); :func:`parse_x509_bundle_der` the Workload API's DER;
* :func:`parse_bundle_document` - a SPIFFE bundle (Trust Domain and Bundle §4: a JWK Set with
  ``spiffe_sequence`` / ``spiffe_refresh_hint``) or a plain RFC 7517 JWKS of JWT-SVID signers.
  JWT authorities are the keys whose ``use`` is ``jwt-svid`` or absent (an allow-list: absent
  reads a plain JWKS the way go-spiffe's ``jwtbundle`` does); X.509 authorities the ``x509-svid``
  ones, each with exactly one certificate in ``x5c`` (X509-SVID §6.1); a key with any other
  ``use`` (``wit-svid``, ``enc``, ``sig``...) or of a type no JWT-SVID algorithm uses is kept out of
  both and reported in :attr:`BundleDocument.ignored` (log it once with :func:`log_ignored`).

Parse failures raise :class:`BundleError` with a :class:`~sidecar.errors.BundleDetail` sub-code.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from sidecar.errors import AgentAuthzError, BundleDetail, ErrorCode

__all__ = [
    "BundleDocument",
    "BundleError",
    "TrustBundles",
    "log_ignored",
    "parse_bundle_document",
    "parse_x509_bundle_der",
    "parse_x509_bundle_pem",
    "split_der",
]

_log = structlog.get_logger("agent_authz.identity")

X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"
_JWT_CURVES = frozenset({"P-256", "P-384", "P-521"})  # ES256 / ES384 / ES512 (JWT-SVID §2.1)
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MAX_SEQUENCE = 2**64 - 1  # Trust Domain and Bundle §4.1.1: at least 64 bits


@dataclass(frozen=True, slots=True)
class TrustBundles:
    """X.509 and JWT authorities by trust domain name.

    A trust domain present with no authorities is *known but empty*: every SVID from it is
    rejected (Trust Domain and Bundle §4.1.3), with ``svid_chain_invalid`` / ``jwt_svid_unknown_key``.

    Attributes:
        x509: trust domain -> X.509 authorities (root or intermediate CA certificates).
        jwt: trust domain -> ``kid`` -> public key of a JWT-SVID signer.
    """

    x509: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    jwt: Mapping[str, Mapping[str, PublicKeyTypes]] = field(default_factory=dict)

    @property
    def trust_domains(self) -> frozenset[str]:
        """Every trust domain with an X.509 or JWT bundle."""
        return frozenset(self.x509) | frozenset(self.jwt)

    def fingerprint(self) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
        """A comparable summary (trust domain, certificate fingerprints) for change detection."""
        from cryptography.hazmat.primitives import hashes

        return tuple(
            (td, tuple(sorted(cert.fingerprint(hashes.SHA256()) for cert in certs)))
            for td, certs in sorted(self.x509.items())
        ) + tuple((f"jwt:{td}", tuple(sorted(k.encode() for k in keys))) for td, keys in sorted(self.jwt.items()))


class BundleError(AgentAuthzError):
    """A trust bundle does not parse or breaks the SPIFFE bundle format.

    Attributes:
        detail: the sub-code.
    """

    code = ErrorCode.BUNDLE_INVALID

    def __init__(self, detail: BundleDetail, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


@dataclass(frozen=True, slots=True)
class BundleDocument:
    """One parsed bundle document (SPIFFE Trust Domain and Bundle §4).

    Attributes:
        x509_authorities: certificates of the ``x509-svid`` entries, in document order.
        jwt_authorities: ``kid`` -> public key of the ``jwt-svid`` (or ``use``-less) entries.
        sequence: ``spiffe_sequence`` (§4.1.1), when present.
        refresh_hint: ``spiffe_refresh_hint`` in seconds (§4.1.2), when present.
        ignored: one line per key kept out of both sets (``"keys[2]: use 'wit-svid'"``).
    """

    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, PublicKeyTypes]
    sequence: int | None = None
    refresh_hint: int | None = None
    ignored: tuple[str, ...] = ()


def parse_x509_bundle_pem(data: bytes) -> tuple[x509.Certificate, ...]:
    """Parse an X.509 bundle: one or more PEM certificates.

    Args:
        data: the file's bytes.

    Returns:
        The certificates, in file order (duplicates dropped).

    Raises:
        BundleError: ``bundle_empty`` for an empty (or whitespace-only) file, ``bundle_malformed``
            for bytes without a PEM certificate or a certificate that does not parse.
    """
    if not data.strip():
        raise BundleError(BundleDetail.BUNDLE_EMPTY, "the bundle file is empty")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, "no PEM certificate in the bundle")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, f"a certificate does not parse ({exc})") from None
    unique: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        unique.setdefault(cert.tbs_certificate_bytes + cert.signature, cert)
    return tuple(unique.values())


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER certificates (the Workload API's ``x509_svid`` and ``bundle`` fields).

    Raises:
        ValueError: not a sequence of complete DER ``SEQUENCE`` values.
    """
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ValueError(f"no DER SEQUENCE at offset {pos}")
        first = data[pos + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or pos + 2 + count > len(data):
                raise ValueError(f"bad DER length at offset {pos}")
            header, length = 2 + count, int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
        end = pos + header + length
        if end > len(data):
            raise ValueError(f"truncated DER value at offset {pos}")
        out.append(data[pos:end])
        pos = end
    return out


def parse_x509_bundle_der(data: bytes) -> tuple[x509.Certificate, ...]:
    """Parse an X.509 bundle as concatenated DER certificates (SPIFFE Workload API ``bundle`` fields).

    No bytes is an empty bundle (the trust domain is known and trusts nothing), as go-spiffe's
    ``x509bundle.ParseRaw`` reads it.

    Raises:
        BundleError: ``bundle_malformed``.
    """
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in split_der(data))
    except ValueError as exc:
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, f"the DER certificates do not parse ({exc})") from None


def _int_member(document: Mapping[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def _x509_entry(index: int, jwk: Mapping[str, Any]) -> x509.Certificate:
    chain = jwk.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1:
        count = len(chain) if isinstance(chain, list) else 0
        raise BundleError(
            BundleDetail.BUNDLE_BAD_X509_ENTRY,
            f"keys[{index}]: an x509-svid entry holds exactly one certificate in x5c, this one {count}",
        )
    try:
        if not isinstance(chain[0], str):
            raise ValueError("not a string")
        return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (ValueError, binascii.Error) as exc:
        raise BundleError(BundleDetail.BUNDLE_BAD_X509_ENTRY, f"keys[{index}]: x5c[0] does not parse ({exc})") from None


def _jwt_entry(index: int, jwk: Mapping[str, Any]) -> tuple[str, PublicKeyTypes] | str:
    """``(kid, key)``, or the reason the key is ignored (a key type no JWT-SVID algorithm uses)."""
    kty = jwk.get("kty")
    if not isinstance(kty, str) or not kty:
        raise BundleError(BundleDetail.BUNDLE_BAD_KEY, f"keys[{index}]: kty is required (RFC 7517 §4.1)")
    if kty not in ("RSA", "EC") or (kty == "EC" and jwk.get("crv") not in _JWT_CURVES):
        return f"keys[{index}]: key type {kty}{'/' + str(jwk.get('crv')) if kty == 'EC' else ''} signs no JWT-SVID"
    kid = jwk.get("kid")
    if kid is None or kid == "":
        raise BundleError(
            BundleDetail.BUNDLE_MISSING_KID, f"keys[{index}]: a JWT authority needs a kid (JWT-SVID §6.1)"
        )
    if not isinstance(kid, str):
        raise BundleError(BundleDetail.BUNDLE_BAD_KEY, f"keys[{index}]: kid must be a string")
    try:
        key = PyJWK(dict(jwk)).key
    except (PyJWTError, ValueError, TypeError) as exc:
        raise BundleError(BundleDetail.BUNDLE_BAD_KEY, f"keys[{index}] ({kid!r}) does not parse ({exc})") from None
    return kid, key


def parse_bundle_document(data: bytes) -> BundleDocument:
    """Parse a SPIFFE bundle or a plain JWKS (Trust Domain and Bundle §4; X509-SVID §6; JWT-SVID §6).

    Unknown top-level and JWK members are tolerated (§4.1). Keys of an unknown type or ``use`` are
    ignored (§4.1.3, §4.2.1), except that a missing ``use`` means a JWT authority (see the module
    docstring). ``keys: []`` is a valid, empty bundle (the trust domain revoked every key).

    Args:
        data: the document's bytes (UTF-8 JSON).

    Returns:
        The :class:`BundleDocument`.

    Raises:
        BundleError: ``bundle_malformed`` (not a JSON object, a member of the wrong type),
            ``bundle_missing_keys`` (no ``keys`` array), ``bundle_missing_kid``, ``bundle_bad_key``
            (a JWK that does not parse or holds private key material), ``bundle_bad_x509_entry``
            (an ``x509-svid`` entry without exactly one certificate).
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, "a bundle is a JSON object (a JWK Set)")
    keys = document.get("keys")
    if keys is None:
        raise BundleError(
            BundleDetail.BUNDLE_MISSING_KEYS, "the keys member is required (Trust Domain and Bundle §4.1.3)"
        )
    if not isinstance(keys, list):
        raise BundleError(BundleDetail.BUNDLE_MALFORMED, "keys must be an array of JWKs")
    sequence = _int_member(document, "spiffe_sequence", minimum=0, maximum=_MAX_SEQUENCE)
    refresh_hint = _int_member(document, "spiffe_refresh_hint", minimum=0, maximum=2**63 - 1)
    x509_authorities: list[x509.Certificate] = []
    jwt_authorities: dict[str, PublicKeyTypes] = {}
    ignored: list[str] = []
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(BundleDetail.BUNDLE_MALFORMED, f"keys[{index}] is not a JSON object")
        private = sorted(_PRIVATE_MEMBERS & set(jwk))
        if private:
            raise BundleError(BundleDetail.BUNDLE_BAD_KEY, f"keys[{index}] carries private key material {private}")
        use = jwk.get("use")
        if use is not None and not isinstance(use, str):
            raise BundleError(BundleDetail.BUNDLE_BAD_KEY, f"keys[{index}]: use must be a string")
        if use == X509_SVID_USE:
            cert = _x509_entry(index, jwk)
            if cert not in x509_authorities:
                x509_authorities.append(cert)
        elif use is None or use == JWT_SVID_USE:
            entry = _jwt_entry(index, jwk)
            if isinstance(entry, str):
                ignored.append(entry)
            else:
                jwt_authorities[entry[0]] = entry[1]
        else:
            ignored.append(f"keys[{index}]: use {use!r}" + (f" (kid {jwk['kid']!r})" if "kid" in jwk else ""))
    return BundleDocument(tuple(x509_authorities), jwt_authorities, sequence, refresh_hint, tuple(ignored))


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()
_MAX_LOGGED = 4096


def log_ignored(trust_domain: str, document: BundleDocument, *, source: str) -> None:
    """Log each ignored key of ``document`` once per process (``bundle_keys_ignored`` warning).

    Args:
        trust_domain: whose bundle it is.
        document: the parsed bundle.
        source: where it came from (a config field or ``workload_api``), for the log line.
    """
    with _logged_lock:
        fresh = [line for line in document.ignored if (trust_domain, line) not in _logged]
        if len(_logged) < _MAX_LOGGED:
            _logged.update((trust_domain, line) for line in fresh)
    if fresh:
        _log.warning("bundle_keys_ignored", trust_domain=trust_domain, source=source, keys=fresh)
