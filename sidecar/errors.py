"""The error hierarchy of agent-authz: one root, stable codes.

Every error is an :class:`AgentAuthzError` and carries a stable ``code`` (:class:`ErrorCode`) used
as a metrics label and a log field; errors of an area with finer outcomes carry a sub-code as well
(:class:`SvidDetail` and :class:`BundleDetail` here, :class:`~sidecar.grants.model.GrantCode` for
grants). Third-party exceptions (pyyaml, pydantic, cryptography, pyjwt) are mapped to these at the
module boundary that calls the library, so callers only ever catch :class:`AgentAuthzError` subclasses.

Never rename a member's value: dashboards, alerts and clients key on these strings (as on
:class:`~sidecar.decision.Reason`).
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "AgentAuthzError",
    "BadRequestError",
    "BundleDetail",
    "ConfigError",
    "DecisionLogError",
    "EnvoyNotFoundError",
    "ErrorCode",
    "IdentityError",
    "KeyLoadError",
    "SpiffeIdError",
    "StateError",
    "SvidDetail",
]


class ErrorCode(enum.StrEnum):
    """The ``code`` of each error class (a metrics label and a log field). Never rename a value."""

    INTERNAL = "internal"
    CONFIG_INVALID = "config_invalid"
    KEY_INVALID = "key_invalid"
    INVALID_SPIFFE_ID = "invalid_spiffe_id"
    BAD_REQUEST = "bad_request"
    ENVOY_NOT_FOUND = "envoy_not_found"
    UNTRUSTED_IDENTITY = "untrusted_identity"
    KEY_MISMATCH = "key_mismatch"
    IDENTITY_UNAVAILABLE = "identity_unavailable"
    IDENTITY_INVALID = "identity_invalid"
    """The sidecar's own SVID, its key or an ``identity.files`` file is unusable (sub-code: :class:`SvidDetail`)."""
    BUNDLE_INVALID = "bundle_invalid"
    """A trust bundle does not parse or breaks the SPIFFE bundle format (sub-code: :class:`BundleDetail`)."""
    DECISION_LOG_UNAVAILABLE = "decision_log_unavailable"
    GRANT_INVALID = "grant_invalid"
    NETFILTER_INVALID = "netfilter_invalid"
    """Redirection (``agent-authz iptables``) options or installation failed."""
    USAGE = "usage"
    ANNOTATION_INVALID = "annotation_invalid"
    INJECTION_DENIED = "injection_denied"
    BAD_REVIEW = "bad_review"
    WEBHOOK_CHECK_FAILED = "webhook_check_failed"
    NOT_AUTHORIZED = "not_authorized"
    """The local agent asked its task API for a change it has no authority over."""
    RESPONSE_UNFILTERABLE = "response_unfilterable"
    """An MCP ``tools/list`` response that cannot be filtered (it is replaced by a JSON-RPC error)."""
    STATE_UNAVAILABLE = "state_unavailable"
    """The durable state file (``state.path``) is refused at start or cannot be written."""
    CONTROL_REFUSED = "control_refused"
    """A freeze/unfreeze/kill action, an approval or an operator token was refused (sub-code:
    :class:`~sidecar.control.documents.ControlCode`)."""
    KUBERNETES_API = "kubernetes_api"
    """A Kubernetes API request failed (the authority's ConfigMaps); ``status`` and ``reason`` say how."""
    AUTHORITY_REFUSED = "authority_refused"
    """The cluster authority refused a request (a revocation, a key announcement, a feed client)."""
    AUTHORITY_UNAVAILABLE = "authority_unavailable"
    """The cluster authority could not be reached or answered something unusable."""


class SvidDetail(enum.StrEnum):
    """Why an SVID was refused: a peer's (the ``detail`` of :class:`IdentityError`, recorded next to
    the reason ``untrusted_identity``) or the sidecar's own (files or Workload API: the ``detail`` of
    its error, of the ``identity_rejected`` log event, of the ``agent_authz_identity_updates_rejected_total``
    label and of ``/readyz``). Never rename a value.

    ``svid_*`` are X.509-SVID failures (SPIFFE X509-SVID §4, §5), ``jwt_svid_*`` JWT-SVID ones
    (JWT-SVID §2, §3). The members marked *local identity only* never reach a decision record.
    """

    SVID_MALFORMED = "svid_malformed"
    """Not URL-encoded PEM (or DER) certificates, over 64 KiB, or an extension that does not parse."""
    SVID_NO_URI_SAN = "svid_no_uri_san"
    """The leaf has no URI SAN (X509-SVID §2)."""
    SVID_MULTIPLE_URI_SANS = "svid_multiple_uri_sans"
    """The leaf has more than one URI SAN (X509-SVID §2)."""
    SVID_INVALID_SPIFFE_ID = "svid_invalid_spiffe_id"
    """The URI SAN is not a SPIFFE ID with a path (SPIFFE-ID §2, X509-SVID §3.1)."""
    SVID_NO_BASIC_CONSTRAINTS = "svid_no_basic_constraints"
    """The leaf has no basicConstraints extension, so it cannot set ``cA`` to false (X509-SVID §4.1)."""
    SVID_LEAF_IS_CA = "svid_leaf_is_ca"
    """The leaf has ``CA:TRUE`` (X509-SVID §4.1)."""
    SVID_BAD_KEY_USAGE = "svid_bad_key_usage"
    """The leaf's keyUsage lacks ``digitalSignature`` or has ``keyCertSign``/``cRLSign`` (X509-SVID §4.3)."""
    SVID_UNKNOWN_TRUST_DOMAIN = "svid_unknown_trust_domain"
    """No X.509 bundle for the SVID's trust domain."""
    SVID_NOT_YET_VALID = "svid_not_yet_valid"
    """Before the leaf's ``notBefore``."""
    SVID_EXPIRED = "svid_expired"
    """At or after the leaf's ``notAfter``."""
    SVID_CHAIN_INVALID = "svid_chain_invalid"
    """No chain to an authority of *that* trust domain's bundle (X509-SVID §5.2); an empty bundle trusts nothing."""
    SVID_SIGNER_NOT_CA = "svid_signer_not_ca"
    """A signing certificate of the local SVID's chain lacks ``cA: true`` (X509-SVID §4.1). Local identity only."""
    SVID_SIGNER_BAD_KEY_USAGE = "svid_signer_bad_key_usage"
    """A signing certificate of the local SVID's chain lacks ``keyCertSign`` (X509-SVID §4.3). Local identity only."""
    SVID_BAD_PRIVATE_KEY = "svid_bad_private_key"
    """The local SVID's private key is missing, encrypted, not PEM/DER or does not parse. Local identity only."""
    SVID_KEY_MISMATCH = "svid_key_mismatch"
    """The local SVID's private key does not belong to its leaf certificate. Local identity only."""
    SVID_SPIFFE_ID_CHANGED = "svid_spiffe_id_changed"
    """A rotation names another SPIFFE ID than the one the policy was compiled for. Local identity only."""
    IDENTITY_FILE_UNREADABLE = "identity_file_unreadable"
    """An ``identity.files`` file (SVID, key or bundle) is missing, unreadable, empty or over the size
    limit. Local identity only."""
    JWT_SVID_MALFORMED = "jwt_svid_malformed"
    """Not a compact JWS of base64url JSON objects, ``exp``/``nbf``/``iat`` not NumericDates, or a token
    that cannot be verified."""
    JWT_SVID_BAD_HEADER = "jwt_svid_bad_header"
    """A header parameter other than ``alg``/``kid``/``typ``, no ``kid``, or ``typ`` not ``JWT``/``JOSE``
    (JWT-SVID §2)."""
    JWT_SVID_BAD_ALGORITHM = "jwt_svid_bad_algorithm"
    """``alg`` is not one of RS/ES/PS 256/384/512 (JWT-SVID §2.1)."""
    JWT_SVID_MISSING_CLAIM = "jwt_svid_missing_claim"
    """No ``sub``, ``aud`` or ``exp`` (JWT-SVID §3)."""
    JWT_SVID_INVALID_SUBJECT = "jwt_svid_invalid_subject"
    """``sub`` is not a SPIFFE ID with a path (JWT-SVID §3.1)."""
    JWT_SVID_UNKNOWN_TRUST_DOMAIN = "jwt_svid_unknown_trust_domain"
    """No JWT bundle for the ``sub``'s trust domain."""
    JWT_SVID_UNKNOWN_KEY = "jwt_svid_unknown_key"
    """The ``kid`` is not in that trust domain's JWT bundle (an empty bundle has none)."""
    JWT_SVID_BAD_SIGNATURE = "jwt_svid_bad_signature"
    """The signature does not verify, or the ``kid`` names a key of another type than ``alg`` needs."""
    JWT_SVID_EXPIRED = "jwt_svid_expired"
    """At or after ``exp`` plus the leeway (``ingress.jwt_svid_leeway``), or ``exp`` before ``iat`` / ``nbf``."""
    JWT_SVID_BAD_AUDIENCE = "jwt_svid_bad_audience"
    """``aud`` is not a non-empty string or list of them, or names no audience this agent accepts (JWT-SVID §3.2)."""
    JWT_SVID_NOT_YET_VALID = "jwt_svid_not_yet_valid"
    """Before ``nbf`` minus the leeway (RFC 7519 §4.1.5)."""
    JWT_SVID_ISSUED_IN_FUTURE = "jwt_svid_issued_in_future"
    """``iat`` is later than now plus the leeway (RFC 7519 §4.1.6): a clock far ahead, or a forged token."""
    JWT_SVID_LIFETIME_TOO_LONG = "jwt_svid_lifetime_too_long"
    """``exp`` is further than ``ingress.jwt_svid_max_lifetime`` from ``iat`` (from ``nbf``, else from
    now, when the token has no ``iat``): a token valid for longer than this agent accepts."""
    JWT_SVID_DUPLICATE = "jwt_svid_duplicate"
    """``Authorization`` holds a bearer credential and another one: several ``Authorization`` headers
    (Envoy joins them with commas) or a list. One JWT-SVID, alone, identifies a caller; nothing falls
    back to another credential."""
    JWT_SVID_PEER_MISMATCH = "jwt_svid_peer_mismatch"
    """The JWT-SVID's subject is not the mTLS peer, and no ingress rule names the peer in ``forwarders``
    for that caller (both identities are recorded: ``caller`` and ``peer``)."""


class BundleDetail(enum.StrEnum):
    """Why a trust bundle (files or Workload API) was refused: the ``detail`` of
    :class:`~sidecar.identity.bundles.BundleError`, of the ``identity_rejected`` log event, of the
    ``agent_authz_identity_updates_rejected_total`` label and of ``/readyz`` (SPIFFE Trust Domain and
    Bundle §4; X509-SVID §6; JWT-SVID §6). The refused bundle is never used. Never rename a value.
    """

    BUNDLE_MALFORMED = "bundle_malformed"
    """Not PEM certificates / not a JSON JWK Set, a certificate that does not parse, a member of the wrong type."""
    BUNDLE_EMPTY = "bundle_empty"
    """An empty PEM bundle file (indistinguishable from a truncated write)."""
    BUNDLE_MISSING_KEYS = "bundle_missing_keys"
    """The document has no ``keys`` array (Trust Domain and Bundle §4.1.3: it MUST be present)."""
    BUNDLE_MISSING_KID = "bundle_missing_kid"
    """A JWT authority without a ``kid`` (JWT-SVID §6.1)."""
    BUNDLE_BAD_KEY = "bundle_bad_key"
    """A JWK of a known type that does not parse, carries private key material, or a non-string ``use``."""
    BUNDLE_BAD_X509_ENTRY = "bundle_bad_x509_entry"
    """An ``x509-svid`` entry whose ``x5c`` does not hold exactly one certificate (X509-SVID §6.1)."""


class AgentAuthzError(Exception):
    """Root of all errors raised by agent-authz."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL


class ConfigError(AgentAuthzError):
    """A configuration file is missing, unreadable or invalid.

    The message names the file, the field (a dotted path such as ``tasks[0].egress[1].paths[0]``)
    and the reason.
    """

    code = ErrorCode.CONFIG_INVALID

    def __init__(self, file: str, field: str, reason: str) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {reason}")


class KeyLoadError(ConfigError):
    """A signing key or credential file cannot be read or has the wrong type."""

    code = ErrorCode.KEY_INVALID


class SpiffeIdError(AgentAuthzError):
    """A string is not a valid SPIFFE ID (SPIFFE-ID §2)."""

    code = ErrorCode.INVALID_SPIFFE_ID


class BadRequestError(AgentAuthzError):
    """A request cannot be judged safely (malformed host, path or protobuf); it is denied."""

    code = ErrorCode.BAD_REQUEST


class EnvoyNotFoundError(AgentAuthzError):
    """No Envoy binary could be located."""

    code = ErrorCode.ENVOY_NOT_FOUND


class IdentityError(AgentAuthzError):
    """A peer's SVID (X.509 or JWT) failed verification.

    ``detail`` is a stable sub-code (:class:`SvidDetail`) such as ``svid_expired`` or
    ``jwt_svid_bad_audience`` that the decision record carries next to the reason ``untrusted_identity``.
    """

    code = ErrorCode.UNTRUSTED_IDENTITY

    def __init__(self, detail: SvidDetail, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


class DecisionLogError(AgentAuthzError):
    """A decision record could not be written (or synced) to its sink; the decision fails closed.

    Attributes:
        sink: ``"file"`` or ``"stdout"``.
    """

    code = ErrorCode.DECISION_LOG_UNAVAILABLE

    def __init__(self, message: str, *, sink: str = "file") -> None:
        self.sink = sink
        super().__init__(message)


class StateError(AgentAuthzError):
    """The durable state file cannot be used: refused at start (another agent's, another schema, not
    SQLite, corrupt, wrong owner or mode, in use) or a write failed; enforcement fails closed.

    The message names the file and the reason (and, at start, the operator's recovery step).

    Attributes:
        file: the state file.
        reason: why.
    """

    code = ErrorCode.STATE_UNAVAILABLE

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")
