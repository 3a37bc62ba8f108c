"""This agent's identity (its X.509-SVID) and the trust bundles, as one immutable value.

Two sources produce it: PEM files (:func:`load_identity_files`, re-read on change like the rest of
the configuration) and the SPIFFE Workload API (:mod:`sidecar.identity.workload_api`). Either way
the SVID is validated (:mod:`sidecar.identity.local_svid`) before it is used, the value is swapped
atomically, and verifiers built from it are rebuilt with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from jwt import PyJWKSet
from jwt.exceptions import PyJWKSetError

from sidecar.errors import BundleDetail, ConfigError, ErrorCode, KeyLoadError, SvidDetail
from sidecar.identity.bundles import (
    BundleError,
    TrustBundles,
    log_ignored,
    parse_bundle_document,
    parse_x509_bundle_pem,
)
from sidecar.identity.local_svid import (
    KeyMismatchError,
    LocalIdentityError,
    Svid,
    parse_svid_pem,
    validate_local_svid,
)

__all__ = ["IdentityLoadError", "IdentityState", "KeyMismatchError", "Svid", "load_identity_files", "parse_jwt_bundle"]


class IdentityLoadError(KeyLoadError):
    """An ``identity.files`` file is unusable: the SVID, its key or a trust bundle.

    Attributes:
        detail: the sub-code: :class:`~sidecar.errors.SvidDetail` (``svid_*``,
            ``identity_file_unreadable``) or :class:`~sidecar.errors.BundleDetail` (``bundle_*``).
    """

    code = ErrorCode.IDENTITY_INVALID
    detail: SvidDetail | BundleDetail

    def __init__(self, file: str, field: str, error: LocalIdentityError | BundleError | ConfigError) -> None:
        if isinstance(error, ConfigError):
            self.detail = SvidDetail.IDENTITY_FILE_UNREADABLE
            super().__init__(file, field, f"{self.detail}: {error.reason}")
        else:
            self.detail = error.detail
            super().__init__(file, field, str(error))


@dataclass(frozen=True, slots=True)
class IdentityState:
    """The agent's SVID and the trust bundles, from one source at one moment.

    Attributes:
        svid: the validated local SVID.
        bundles: the trust bundles.
        source: ``files`` or ``workload_api``.
        problems: refused updates not yet superseded by a good one (``"<sub-code>: <reason>"``); this
            state is the last good one.
    """

    svid: Svid
    bundles: TrustBundles
    source: str
    problems: tuple[str, ...] = ()


def parse_jwt_bundle(data: bytes) -> dict[str, PublicKeyTypes]:
    """Parse a plain JWKS of issuer keys (grant issuers) into ``kid -> public key``.

    Trust bundles of JWT-SVID signers are SPIFFE bundles: read them with
    :func:`sidecar.identity.bundles.parse_bundle_document` (its ``use`` rule applies).

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
    now: float,
) -> IdentityState:
    """Load and validate the SVID, key and bundles named in ``identity.files``.

    The SVID must pass :func:`~sidecar.identity.local_svid.validate_local_svid` against the
    bundles loaded with it (so it must chain to its own trust domain's bundle, and not be expired).

    Args:
        read: reads a file named in config: ``(path, field) -> bytes`` (records it for reload).
        svid / key: the ``svid`` (PEM chain, leaf first) and ``key`` files.
        bundles / jwt_bundles: trust domain -> X.509 bundle (PEM) / JWT bundle (SPIFFE bundle or JWKS) file.
        file: the config file, for error messages.
        now: POSIX seconds.

    Raises:
        IdentityLoadError: a file is missing, unreadable or empty (``identity_file_unreadable``),
            does not parse, or the SVID is invalid; errors name the field and start with the sub-code.
    """

    def checked_read(path: Path, field_name: str) -> bytes:
        try:
            return read(path, field_name)
        except ConfigError as exc:
            raise IdentityLoadError(file, field_name, exc) from None

    chain_pem = checked_read(svid, "identity.files.svid")
    key_pem = checked_read(key, "identity.files.key")
    x509_bundles = {}
    for trust_domain, path in sorted(bundles.items()):
        field_name = f"identity.files.bundles.{trust_domain}"
        try:
            x509_bundles[trust_domain] = parse_x509_bundle_pem(checked_read(path, field_name))
        except BundleError as exc:
            raise IdentityLoadError(file, field_name, exc) from None
    jwt_keys = {}
    for trust_domain, path in sorted(jwt_bundles.items()):
        field_name = f"identity.files.jwt_bundles.{trust_domain}"
        try:
            document = parse_bundle_document(checked_read(path, field_name))
        except BundleError as exc:
            raise IdentityLoadError(file, field_name, exc) from None
        log_ignored(trust_domain, document, source=field_name)
        jwt_keys[trust_domain] = document.jwt_authorities
    trust = TrustBundles(x509_bundles, jwt_keys)
    try:
        chain, private_key = parse_svid_pem(chain_pem, key_pem)
        agent_svid = validate_local_svid(chain, private_key, trust, now=now)
    except LocalIdentityError as exc:
        key_fault = exc.detail in (SvidDetail.SVID_BAD_PRIVATE_KEY, SvidDetail.SVID_KEY_MISMATCH)
        raise IdentityLoadError(file, "identity.files.key" if key_fault else "identity.files.svid", exc) from None
    return IdentityState(agent_svid, trust, "files")
