"""Signed task grants: delegation with attenuation, verification, revocation."""

from sidecar.grants.attenuation import AttenuationError, check_attenuation
from sidecar.grants.model import GRANT_TYP, REVOCATION_TYP, Grant, GrantError
from sidecar.grants.verify import GrantVerifier

__all__ = [
    "GRANT_TYP",
    "REVOCATION_TYP",
    "AttenuationError",
    "Grant",
    "GrantError",
    "GrantVerifier",
    "check_attenuation",
]
