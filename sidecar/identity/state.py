"""This agent's identity (its X.509-SVID) and the trust bundles, as one immutable value.

Two sources produce it: PEM files (:func:`load_identity_files`, re-read on change like the rest of
the configuration) and the SPIFFE Workload API (:mod:`sidecar.identity.workload_api`). Either way
the value is swapped atomically, and verifiers built from it are rebuilt with it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from jwt import PyJWKSet
from jwt.exceptions import PyJWKSetError

from sidecar.errors import AgentAuthzError, ErrorCode, KeyLoadError, SpiffeIdError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = ["IdentityState", "KeyMismatchError", "Svid", "load_identity_files", "parse_jwt_bundle", "svid_from_chain"]


class KeyMismatchError(AgentAuthzError, ValueError):
    """The private key does not belong to the SVID's leaf certificate (a ``ValueError`` too, as the
    other reasons :func:`svid_from_chain` refuses a chain)."""

    code = ErrorCode.KEY_MISMATCH


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


@dataclass(frozen=True, slots=True)
class IdentityState:
    """The agent's SVID and the trust bundles, from one source at one moment."""

    svid: Svid
    bundles: TrustBundles
    source: str


def svid_from_chain(chain: list[x509.Certificate], key: PrivateKeyTypes) -> Svid:
    """Build an :class:`Svid` from a certificate chain (leaf first) and its key.

    Raises:
        ValueError: no certificates, no single URI SAN, an invalid SPIFFE ID, or a key that does
            not match the leaf (:class:`KeyMismatchError`).
    """
    if not chain:
        raise ValueError("no certificate")
    leaf = chain[0]
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise ValueError(f"the SVID must have exactly one URI SAN, it has {len(uris)}")
    try:
        spiffe_id = str(parse_spiffe_id(uris[0]))
    except SpiffeIdError as exc:
        raise ValueError(str(exc)) from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise KeyMismatchError("the private key does not match the SVID")
    digest = leaf.fingerprint(hashes.SHA256())
    return Svid(
        spiffe_id=spiffe_id,
        chain=tuple(chain),
        private_key=key,
        serial=format(leaf.serial_number, "x"),
        not_after=leaf.not_valid_after_utc.timestamp(),
        x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
    )


def parse_jwt_bundle(data: bytes) -> dict[str, PublicKeyTypes]:
    """Parse a JWKS (SPIFFE bundle format) into ``kid -> public key``.

    Raises:
        ValueError: not a JWKS, or a key without ``kid``.
    """
    try:
        document = json.loads(data)
        keyset = PyJWKSet.from_dict({"keys": [k for k in document.get("keys", []) if k.get("use") != "x509-svid"]})
    except (ValueError, AttributeError, PyJWKSetError) as exc:
        raise ValueError(f"not a JWKS ({exc})") from None
    keys: dict[str, PublicKeyTypes] = {}
    for jwk in keyset.keys:
        if not jwk.key_id:
            raise ValueError("every JWT authority needs a kid")
        keys[jwk.key_id] = jwk.key
    return keys


def load_identity_files(
    read: Callable[[Path, str], bytes],
    *,
    svid: Path,
    key: Path,
    bundles: Mapping[str, Path],
    jwt_bundles: Mapping[str, Path],
    file: str,
) -> IdentityState:
    """Load the SVID, key and bundles named in ``identity.files``.

    Args:
        read: reads a file named in config: ``(path, field) -> bytes`` (records it for reload).
        svid / key: the ``svid`` (PEM chain, leaf first) and ``key`` files.
        bundles / jwt_bundles: trust domain -> X.509 bundle (PEM) / JWT bundle (JWKS) file.
        file: the config file, for error messages.

    Raises:
        KeyLoadError: a file is missing or does not parse; errors name the field.
    """
    chain_pem = read(svid, "identity.files.svid")
    key_pem = read(key, "identity.files.key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise KeyLoadError(file, "identity.files.svid", f"not PEM certificates ({exc})") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyLoadError(file, "identity.files.key", f"not an unencrypted PEM private key ({exc})") from None
    try:
        agent_svid = svid_from_chain(chain, private_key)
    except KeyMismatchError as exc:
        raise KeyLoadError(file, "identity.files.key", str(exc)) from None
    except ValueError as exc:
        raise KeyLoadError(file, "identity.files.svid", str(exc)) from None
    x509_bundles = {}
    for trust_domain, path in sorted(bundles.items()):
        field_name = f"identity.files.bundles.{trust_domain}"
        try:
            x509_bundles[trust_domain] = tuple(x509.load_pem_x509_certificates(read(path, field_name)))
        except ValueError as exc:
            raise KeyLoadError(file, field_name, f"not PEM certificates ({exc})") from None
    jwt_keys = {}
    for trust_domain, path in sorted(jwt_bundles.items()):
        field_name = f"identity.files.jwt_bundles.{trust_domain}"
        try:
            jwt_keys[trust_domain] = parse_jwt_bundle(read(path, field_name))
        except ValueError as exc:
            raise KeyLoadError(file, field_name, str(exc)) from None
    return IdentityState(agent_svid, TrustBundles(x509_bundles, jwt_keys), "files")
