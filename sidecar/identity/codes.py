"""Stable sub-codes of identity failures added for SPIFFE conformance (one place for all of them).

They extend the ``svid_*`` / ``jwt_svid_*`` sub-codes listed in :mod:`sidecar.identity.x509svid`
and :mod:`sidecar.identity.jwtsvid`: a peer's failure carries one as the ``detail`` prefix of the
``untrusted_identity`` reason; a rejected local identity (files or Workload API) or trust bundle
carries one in its error, its log event, the ``agent_authz_identity_updates_rejected_total``
metric label and ``/readyz``. Values never change once released.
"""

from __future__ import annotations

__all__ = [
    "BUNDLE_BAD_KEY",
    "BUNDLE_BAD_X509_ENTRY",
    "BUNDLE_EMPTY",
    "BUNDLE_MALFORMED",
    "BUNDLE_MISSING_KEYS",
    "BUNDLE_MISSING_KID",
    "IDENTITY_FILE_UNREADABLE",
    "SVID_BAD_PRIVATE_KEY",
    "SVID_KEY_MISMATCH",
    "SVID_NO_BASIC_CONSTRAINTS",
    "SVID_SIGNER_BAD_KEY_USAGE",
    "SVID_SIGNER_NOT_CA",
    "SVID_SPIFFE_ID_CHANGED",
]

# X.509-SVIDs (peers and the local identity)
SVID_NO_BASIC_CONSTRAINTS = "svid_no_basic_constraints"
"""The leaf has no basicConstraints extension, so it cannot set ``cA`` to false (X509-SVID §4.1)."""
SVID_SIGNER_NOT_CA = "svid_signer_not_ca"
"""A signing certificate of the local SVID's chain lacks ``cA: true`` (X509-SVID §4.1)."""
SVID_SIGNER_BAD_KEY_USAGE = "svid_signer_bad_key_usage"
"""A signing certificate of the local SVID's chain lacks ``keyCertSign`` (X509-SVID §4.3)."""

# The local identity only
SVID_BAD_PRIVATE_KEY = "svid_bad_private_key"
"""The local SVID's private key is missing, not PEM/DER or does not parse."""
SVID_KEY_MISMATCH = "svid_key_mismatch"
"""The local SVID's private key does not belong to its leaf certificate."""
SVID_SPIFFE_ID_CHANGED = "svid_spiffe_id_changed"
"""A rotation names another SPIFFE ID than the one the policy was compiled for."""

IDENTITY_FILE_UNREADABLE = "identity_file_unreadable"
"""An ``identity.files`` file is missing, unreadable, empty or over the size limit."""

# Trust bundles (SPIFFE Trust Domain and Bundle §4; X509-SVID §6; JWT-SVID §6)
BUNDLE_MALFORMED = "bundle_malformed"
"""Not PEM certificates / not a JSON JWK Set, a certificate that does not parse, a member of the wrong type."""
BUNDLE_EMPTY = "bundle_empty"
"""An empty PEM bundle file (indistinguishable from a truncated write; see docs/identity-conformance.md)."""
BUNDLE_MISSING_KEYS = "bundle_missing_keys"
"""The document has no ``keys`` array (Trust Domain and Bundle §4.1.3: it MUST be present)."""
BUNDLE_MISSING_KID = "bundle_missing_kid"
"""A JWT authority without a ``kid`` (JWT-SVID §6.1)."""
BUNDLE_BAD_KEY = "bundle_bad_key"
"""A JWK of a known type that does not parse, carries private key material, or a non-string ``use``."""
BUNDLE_BAD_X509_ENTRY = "bundle_bad_x509_entry"
"""An ``x509-svid`` entry whose ``x5c`` does not hold exactly one certificate (X509-SVID §6.1)."""
