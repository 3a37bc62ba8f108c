"""The sidecar's own X.509-SVID: parsed and validated with the same rules as a peer's, and more.

Whichever source delivers it (PEM files, the Workload API's DER), at start and on every rotation,
the local SVID must pass:

* the peer leaf checks (:func:`sidecar.identity.x509svid.check_leaf`: one URI SAN with a SPIFFE ID
  that has a path, basicConstraints ``CA:FALSE``, keyUsage ``digitalSignature`` without
  ``keyCertSign``/``cRLSign``, inside its validity window - so never expired; X509-SVID §3-§4, §5.2);
* every signing certificate of the chain has ``CA:TRUE`` and ``keyCertSign`` (X509-SVID §4.1, §4.3);
* the private key belongs to the leaf;
* the chain verifies to the bundle of the SVID's own trust domain (X509-SVID §5.1), as a peer's
  would: an SVID its peers would refuse is not an identity.

A failure raises :class:`LocalIdentityError` whose ``detail`` is an ``svid_*`` sub-code (those of
:mod:`sidecar.identity.x509svid` plus the local-only ones; all :class:`~sidecar.errors.SvidDetail`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sidecar.errors import AgentAuthzError, ErrorCode, IdentityError, SvidDetail
from sidecar.identity.bundles import TrustBundles, split_der
from sidecar.identity.x509svid import X509SvidVerifier, check_leaf

__all__ = ["KeyMismatchError", "LocalIdentityError", "Svid", "parse_svid_der", "parse_svid_pem", "validate_local_svid"]

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class LocalIdentityError(AgentAuthzError):
    """The sidecar's own SVID (or its key) is unusable.

    Attributes:
        detail: the ``svid_*`` sub-code.
    """

    code = ErrorCode.IDENTITY_INVALID

    def __init__(self, detail: SvidDetail, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


class KeyMismatchError(LocalIdentityError, ValueError):
    """The private key does not belong to the SVID's leaf certificate (``svid_key_mismatch``); a
    ``ValueError`` too, for callers that catch that."""

    code = ErrorCode.KEY_MISMATCH

    def __init__(self, message: str) -> None:
        super().__init__(SvidDetail.SVID_KEY_MISMATCH, message)


@dataclass(frozen=True, slots=True)
class Svid:
    """This agent's X.509-SVID.

    Attributes:
        spiffe_id: the ID in the leaf's URI SAN.
        chain: leaf first.
        private_key: the leaf's key (not in ``repr``).
        serial: leaf serial number, hex.
        not_after: leaf expiry, POSIX seconds.
        x5t_s256: base64url SHA-256 of the leaf DER (RFC 8705 §3.1 ``cnf`` member).
    """

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes = field(repr=False)
    serial: str
    not_after: float
    x5t_s256: str


def parse_svid_pem(cert_pem: bytes, key_pem: bytes) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """Parse a PEM chain (leaf first) and a PEM private key; one file may hold both.

    Raises:
        LocalIdentityError: ``svid_malformed`` (no certificate, or one that does not parse) or
            ``svid_bad_private_key`` (no key, an encrypted one, or one that does not parse).
    """
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise LocalIdentityError(SvidDetail.SVID_MALFORMED, "no PEM certificate")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise LocalIdentityError(SvidDetail.SVID_MALFORMED, f"a certificate does not parse ({exc})") from None
    if b"PRIVATE KEY-----" not in key_pem:
        raise LocalIdentityError(SvidDetail.SVID_BAD_PRIVATE_KEY, "no PEM private key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LocalIdentityError(
            SvidDetail.SVID_BAD_PRIVATE_KEY, f"not an unencrypted PEM private key ({exc})"
        ) from None
    return chain, key


def parse_svid_der(chain_der: bytes, key_der: bytes) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """Parse concatenated DER certificates (leaf first) and a PKCS#8 DER key (SPIFFE Workload API §5.2).

    Raises:
        LocalIdentityError: ``svid_malformed`` or ``svid_bad_private_key``.
    """
    try:
        chain = [x509.load_der_x509_certificate(der) for der in split_der(chain_der)]
    except ValueError as exc:
        raise LocalIdentityError(SvidDetail.SVID_MALFORMED, f"the certificate chain does not parse ({exc})") from None
    if not chain:
        raise LocalIdentityError(SvidDetail.SVID_MALFORMED, "no certificate")
    try:
        key = serialization.load_der_private_key(key_der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LocalIdentityError(SvidDetail.SVID_BAD_PRIVATE_KEY, f"not a PKCS#8 DER private key ({exc})") from None
    return chain, key


def _check_signers(signers: Sequence[x509.Certificate]) -> None:
    for index, cert in enumerate(signers, start=1):
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise LocalIdentityError(SvidDetail.SVID_SIGNER_NOT_CA, f"chain[{index}] has no basicConstraints") from None
        except ValueError as exc:
            raise LocalIdentityError(
                SvidDetail.SVID_MALFORMED, f"chain[{index}]: bad basicConstraints ({exc})"
            ) from None
        if not basic.ca:
            raise LocalIdentityError(SvidDetail.SVID_SIGNER_NOT_CA, f"chain[{index}] signs the SVID but has CA:FALSE")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise LocalIdentityError(SvidDetail.SVID_SIGNER_BAD_KEY_USAGE, f"chain[{index}] has no keyUsage") from None
        except ValueError as exc:
            raise LocalIdentityError(SvidDetail.SVID_MALFORMED, f"chain[{index}]: bad keyUsage ({exc})") from None
        if not usage.key_cert_sign:
            raise LocalIdentityError(SvidDetail.SVID_SIGNER_BAD_KEY_USAGE, f"chain[{index}] lacks keyCertSign")


def validate_local_svid(
    chain: Sequence[x509.Certificate], key: PrivateKeyTypes, bundles: TrustBundles, *, now: float
) -> Svid:
    """Validate the sidecar's own SVID (module docstring) and build the :class:`Svid`.

    Args:
        chain: leaf first, then the intermediates up to (not necessarily including) the bundle's CA.
        key: the leaf's private key.
        bundles: the trust bundles delivered with it; the SVID's own trust domain must be there.
        now: POSIX seconds.

    Returns:
        The :class:`Svid`.

    Raises:
        LocalIdentityError: the first rule broken, as an ``svid_*`` sub-code.
    """
    if not chain:
        raise LocalIdentityError(SvidDetail.SVID_MALFORMED, "no certificate")
    leaf = chain[0]
    try:
        check_leaf(leaf, now)
    except IdentityError as exc:
        raise LocalIdentityError(exc.detail, str(exc).split(": ", 1)[-1]) from None
    _check_signers(chain[1:])
    if leaf.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise KeyMismatchError("the private key does not belong to the leaf certificate")
    try:
        verified = X509SvidVerifier(bundles, max_entries=1).verify_certificates(leaf, list(chain[1:]), now=now)
    except IdentityError as exc:
        raise LocalIdentityError(exc.detail, str(exc).split(": ", 1)[-1]) from None
    digest = leaf.fingerprint(hashes.SHA256())
    return Svid(
        spiffe_id=verified.spiffe_id,
        chain=tuple(chain),
        private_key=key,
        serial=verified.serial,
        not_after=leaf.not_valid_after_utc.timestamp(),
        x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
    )
