"""The error hierarchy of agent-authz.

Every error carries a stable ``code`` used as a metrics label and a log field. Third-party
exceptions (pyyaml, pydantic, cryptography, pyjwt) are mapped to these at the module boundary
that calls the library, so callers only ever catch :class:`AgentAuthzError` subclasses.
"""

from __future__ import annotations

__all__ = [
    "AgentAuthzError",
    "BadRequestError",
    "ConfigError",
    "DecisionLogError",
    "EnvoyNotFoundError",
    "IdentityError",
    "KeyLoadError",
    "SpiffeIdError",
]


class AgentAuthzError(Exception):
    """Root of all errors raised by agent-authz."""

    code = "internal"


class ConfigError(AgentAuthzError):
    """A configuration file is missing, unreadable or invalid.

    The message names the file, the field (a dotted path such as ``tasks[0].egress[1].paths[0]``)
    and the reason.
    """

    code = "config_invalid"

    def __init__(self, file: str, field: str, reason: str) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {reason}")


class KeyLoadError(ConfigError):
    """A signing key or credential file cannot be read or has the wrong type."""

    code = "key_invalid"


class SpiffeIdError(AgentAuthzError):
    """A string is not a valid SPIFFE ID (SPIFFE-ID §2)."""

    code = "invalid_spiffe_id"


class BadRequestError(AgentAuthzError):
    """A request cannot be judged safely (malformed host, path or protobuf); it is denied."""

    code = "bad_request"


class EnvoyNotFoundError(AgentAuthzError):
    """No Envoy binary could be located."""

    code = "envoy_not_found"


class IdentityError(AgentAuthzError):
    """A peer's SVID (X.509 or JWT) failed verification.

    ``detail`` is a stable sub-code such as ``svid_expired`` or ``jwt_svid_bad_audience`` that the
    decision record carries next to the reason ``untrusted_identity``.
    """

    code = "untrusted_identity"

    def __init__(self, detail: str, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


class DecisionLogError(AgentAuthzError):
    """A decision record could not be written (or synced) to its sink; the decision fails closed.

    Attributes:
        sink: ``"file"`` or ``"stdout"``.
    """

    code = "decision_log_unavailable"

    def __init__(self, message: str, *, sink: str = "file") -> None:
        self.sink = sink
        super().__init__(message)
