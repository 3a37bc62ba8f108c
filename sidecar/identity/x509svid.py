"""Verify a peer's X.509-SVID as Envoy reports it (X509-SVID §4, §5; SPIFFE-ID §2).

Envoy sends the peer's leaf certificate as URL-encoded PEM (``attributes.source.certificate``, with
``include_peer_certificate``); intermediates, when the peer presented any, come from the
``Chain`` element of the ``x-forwarded-client-cert`` header that the rendered inbound listener sets
(``forward_client_cert_details: SANITIZE_SET``).

Checks, in order (each failure has a stable ``detail`` code):

* ``svid_malformed`` - not URL-encoded PEM certificates, or over 64 KiB;
* ``svid_no_uri_san`` / ``svid_multiple_uri_sans`` - exactly one URI SAN (X509-SVID §2);
* ``svid_invalid_spiffe_id`` - the URI SAN is a strict SPIFFE ID with a path (SPIFFE-ID §2, X509-SVID §3.1);
* ``svid_no_basic_constraints`` / ``svid_leaf_is_ca`` - the leaf must carry basicConstraints with
  ``CA:FALSE`` (X509-SVID §4.1, §5.2);
* ``svid_bad_key_usage`` - key usage present with ``digitalSignature``, without ``keyCertSign``
  or ``cRLSign`` (X509-SVID §4.3);
* ``svid_not_yet_valid`` / ``svid_expired`` - validity window;
* ``svid_unknown_trust_domain`` - no bundle for the ID's trust domain;
* ``svid_chain_invalid`` - no chain to an authority in *that* trust domain's bundle (X509-SVID §5.2);
  a bundle that is present but empty trusts nothing (Trust Domain and Bundle §4.1.3).

The same checks (:func:`check_leaf` and :meth:`X509SvidVerifier.verify_certificates`) validate the
sidecar's own SVID (:mod:`sidecar.identity.local_svid`).

Verified results are cached by the SHA-256 digest of the encoded certificate and chain (32 bytes a
key, whatever the chain's size), at most ``max_entries`` of them, until the first certificate of
the verified chain expires; a bundle change (a rotation, or a CA taken out of it: how SPIFFE
revokes) means a new verifier, so a new, empty cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import urllib.parse
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from sidecar.errors import IdentityError, SpiffeIdError, SvidDetail
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = ["VerifiedSvid", "X509SvidVerifier", "chain_from_xfcc", "check_leaf"]

_MAX_PEM = 64 * 1024
_XFCC_CHAIN = re.compile(r'(?:^|;)Chain="([^"]*)"')


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    """A verified peer identity.

    Attributes:
        spiffe_id: the SPIFFE ID from the URI SAN.
        trust_domain: its trust domain.
        serial: certificate serial number, hex.
        not_after: expiry, POSIX seconds.
        fingerprint: SHA-256 of the leaf DER, hex (RFC 8705 ``x5t#S256`` is its base64url form).
    """

    spiffe_id: str
    trust_domain: str
    serial: str
    not_after: float
    fingerprint: str


def chain_from_xfcc(value: str) -> str:
    """The URL-encoded ``Chain`` element of an ``x-forwarded-client-cert`` value, or ``""``.

    With ``SANITIZE_SET`` Envoy writes exactly one element for the current peer; URL-encoding keeps
    ``"`` and ``;`` out of the PEM, so the quoted value cannot be confused with another field.
    """
    match = _XFCC_CHAIN.search(value)
    return match.group(1) if match else ""


def _decode(encoded: str, what: str) -> list[x509.Certificate]:
    if len(encoded) > _MAX_PEM:
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"{what} larger than {_MAX_PEM} bytes")
    if not encoded.isascii():
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"{what} is not URL-encoded ASCII")
    data = urllib.parse.unquote_to_bytes(encoded)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"{what} is not PEM")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"{what} does not parse ({exc})") from None


def check_leaf(leaf: x509.Certificate, now: float) -> tuple[str, str]:
    """Check ``leaf`` against the X509-SVID leaf profile and its validity window at ``now``.

    One URI SAN holding a SPIFFE ID with a path (X509-SVID §2, §3.1; SPIFFE-ID §2), basicConstraints
    with ``CA:FALSE`` (§4.1, §5.2), keyUsage with ``digitalSignature`` and without ``keyCertSign`` /
    ``cRLSign`` (§4.3), ``notBefore <= now < notAfter``.

    Args:
        leaf: the certificate.
        now: POSIX seconds.

    Returns:
        ``(spiffe_id, trust_domain)``.

    Raises:
        IdentityError: ``svid_malformed``, ``svid_no_uri_san``, ``svid_multiple_uri_sans``,
            ``svid_invalid_spiffe_id``, ``svid_no_basic_constraints``, ``svid_leaf_is_ca``,
            ``svid_bad_key_usage``, ``svid_not_yet_valid`` or ``svid_expired``.
    """
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as exc:  # malformed extension
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"bad subjectAltName ({exc})") from None
    if not uris:
        raise IdentityError(SvidDetail.SVID_NO_URI_SAN, "the certificate has no URI SAN")
    if len(uris) > 1:
        raise IdentityError(SvidDetail.SVID_MULTIPLE_URI_SANS, f"the certificate has {len(uris)} URI SANs")
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except SpiffeIdError as exc:
        raise IdentityError(SvidDetail.SVID_INVALID_SPIFFE_ID, str(exc)) from None
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            SvidDetail.SVID_NO_BASIC_CONSTRAINTS, "the leaf has no basicConstraints (it must set CA:FALSE)"
        ) from None
    except ValueError as exc:
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"bad basicConstraints ({exc})") from None
    if basic.ca:
        raise IdentityError(SvidDetail.SVID_LEAF_IS_CA, "the leaf has CA:TRUE")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError(SvidDetail.SVID_BAD_KEY_USAGE, "the leaf has no keyUsage extension") from None
    except ValueError as exc:
        raise IdentityError(SvidDetail.SVID_MALFORMED, f"bad keyUsage ({exc})") from None
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise IdentityError(
            SvidDetail.SVID_BAD_KEY_USAGE, "keyUsage must have digitalSignature, not keyCertSign/cRLSign"
        )
    if now < leaf.not_valid_before_utc.timestamp():
        raise IdentityError(SvidDetail.SVID_NOT_YET_VALID, "the certificate is not yet valid")
    if now >= leaf.not_valid_after_utc.timestamp():
        raise IdentityError(SvidDetail.SVID_EXPIRED, "the certificate has expired")
    return str(spiffe_id), str(spiffe_id.trust_domain)


class X509SvidVerifier:
    """Verifies X.509-SVIDs against per-trust-domain bundles, with a bounded cache.

    Args:
        bundles: the trust bundles (a new verifier is built when they change).
        max_entries: cache size bound; the oldest entry is evicted first.
    """

    def __init__(self, bundles: TrustBundles, *, max_entries: int = 10_000) -> None:
        self.bundles = bundles
        self._stores = {td: Store(list(certs)) for td, certs in bundles.x509.items() if certs}
        self._cache: dict[bytes, VerifiedSvid] = {}
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    def verify(self, certificate: str, chain: str = "", *, now: float) -> VerifiedSvid:
        """Verify a URL-encoded PEM leaf (and optional URL-encoded PEM chain).

        Args:
            certificate: ``attributes.source.certificate`` from Envoy.
            chain: the XFCC ``Chain`` element (leaf first), or ``""``.
            now: POSIX seconds.

        Returns:
            The :class:`VerifiedSvid`.

        Raises:
            IdentityError: with one of the ``detail`` codes listed in the module docstring.
        """
        # length-prefixed: no other (certificate, chain) pair encodes to the same bytes
        key = hashlib.sha256(f"{len(certificate)}:{certificate}{chain}".encode(errors="surrogatepass")).digest()
        hit = self._cache.get(key)
        if hit is not None and now < hit.not_after:
            self.hits += 1
            return hit
        self.misses += 1
        verified = self._verify(certificate, chain, now)
        if len(self._cache) >= self._max:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = verified
        return verified

    def _verify(self, certificate: str, chain: str, now: float) -> VerifiedSvid:
        leaf = _decode(certificate, "peer certificate")[0]
        return self.verify_certificates(leaf, _decode(chain, "XFCC chain") if chain else [], now=now)

    def verify_certificates(self, leaf: x509.Certificate, chain: list[x509.Certificate], *, now: float) -> VerifiedSvid:
        """Verify already-parsed certificates (e.g. a JWS ``x5c`` chain); no cache.

        Args:
            leaf: the SVID.
            chain: more certificates (the leaf itself may be among them), intermediates for path building.
            now: POSIX seconds.

        Raises:
            IdentityError: as :meth:`verify`.
        """
        spiffe_id, trust_domain = check_leaf(leaf, now)
        store = self._stores.get(trust_domain)
        if store is None:
            if trust_domain in self.bundles.x509:
                raise IdentityError(
                    SvidDetail.SVID_CHAIN_INVALID, f"the {trust_domain} bundle is empty: it trusts nothing"
                )
            raise IdentityError(SvidDetail.SVID_UNKNOWN_TRUST_DOMAIN, f"no trust bundle for {trust_domain}")
        fingerprint = leaf.fingerprint(hashes.SHA256())
        intermediates = [c for c in chain if c.fingerprint(hashes.SHA256()) != fingerprint]
        verifier = (
            PolicyBuilder()
            .store(store)
            .time(dt.datetime.fromtimestamp(now, dt.UTC))
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise IdentityError(
                SvidDetail.SVID_CHAIN_INVALID, f"no chain to the {trust_domain} bundle ({exc})"
            ) from None
        not_after = min(c.not_valid_after_utc.timestamp() for c in (leaf, *verified.chain))
        return VerifiedSvid(spiffe_id, trust_domain, format(leaf.serial_number, "x"), not_after, fingerprint.hex())
