"""The error hierarchy of agent-authz: one root, stable codes.

Every error is an :class:`AgentAuthzError` and carries a stable ``code`` (:class:`ErrorCode`) used
as a metrics label and a log field; errors of an area with finer outcomes carry a sub-code as well
(:class:`SvidDetail` here, :class:`~sidecar.grants.model.GrantCode` for grants). Third-party
exceptions (pyyaml, pydantic, cryptography, pyjwt) are mapped to these at the module boundary that
calls the library, so callers only ever catch :class:`AgentAuthzError` subclasses.

Never rename a member's value: dashboards, alerts and clients key on these strings (as on
:class:`~sidecar.decision.Reason`).
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "AgentAuthzError",
    "BadRequestError",
    "ConfigError",
    "DecisionLogError",
    "EnvoyNotFoundError",
    "ErrorCode",
    "IdentityError",
    "KeyLoadError",
    "SpiffeIdError",
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
    DECISION_LOG_UNAVAILABLE = "decision_log_unavailable"
    GRANT_INVALID = "grant_invalid"
    NETFILTER_INVALID = "netfilter_invalid"
    """Redirection (``agent-authz iptables``) options or installation failed."""
    USAGE = "usage"
    ANNOTATION_INVALID = "annotation_invalid"
    INJECTION_DENIED = "injection_denied"
    BAD_REVIEW = "bad_review"
    WEBHOOK_CHECK_FAILED = "webhook_check_failed"
    KUBERNETES_API = "kubernetes_api"
    """A Kubernetes API request failed (the authority's ConfigMaps); ``status`` and ``reason`` say how."""
    AUTHORITY_REFUSED = "authority_refused"
    """The cluster authority refused a request (a revocation, a key announcement, a feed client)."""
    AUTHORITY_UNAVAILABLE = "authority_unavailable"
    """The cluster authority could not be reached or answered something unusable."""


class SvidDetail(enum.StrEnum):
    """Why a peer's SVID failed verification: the ``detail`` of :class:`IdentityError`, recorded next
    to the reason ``untrusted_identity``. Never rename a value.

    ``svid_*`` are X.509-SVID failures (SPIFFE X509-SVID §4.3, §5.2), ``jwt_svid_*`` JWT-SVID ones
    (JWT-SVID §2, §3).
    """

    SVID_MALFORMED = "svid_malformed"
    SVID_NO_URI_SAN = "svid_no_uri_san"
    SVID_MULTIPLE_URI_SANS = "svid_multiple_uri_sans"
    SVID_INVALID_SPIFFE_ID = "svid_invalid_spiffe_id"
    SVID_LEAF_IS_CA = "svid_leaf_is_ca"
    SVID_BAD_KEY_USAGE = "svid_bad_key_usage"
    SVID_UNKNOWN_TRUST_DOMAIN = "svid_unknown_trust_domain"
    SVID_NOT_YET_VALID = "svid_not_yet_valid"
    SVID_EXPIRED = "svid_expired"
    SVID_CHAIN_INVALID = "svid_chain_invalid"
    JWT_SVID_MALFORMED = "jwt_svid_malformed"
    JWT_SVID_BAD_HEADER = "jwt_svid_bad_header"
    JWT_SVID_BAD_ALGORITHM = "jwt_svid_bad_algorithm"
    JWT_SVID_MISSING_CLAIM = "jwt_svid_missing_claim"
    JWT_SVID_INVALID_SUBJECT = "jwt_svid_invalid_subject"
    JWT_SVID_UNKNOWN_TRUST_DOMAIN = "jwt_svid_unknown_trust_domain"
    JWT_SVID_UNKNOWN_KEY = "jwt_svid_unknown_key"
    JWT_SVID_BAD_SIGNATURE = "jwt_svid_bad_signature"
    JWT_SVID_EXPIRED = "jwt_svid_expired"
    JWT_SVID_BAD_AUDIENCE = "jwt_svid_bad_audience"


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
