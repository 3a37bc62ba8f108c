"""Strict SPIFFE ID parsing (SPIFFE-ID §2).

py-spiffe's :class:`spiffe.SpiffeId` does the grammar work; on top of it we reject what it accepts
leniently: upper-case scheme or trust domain (it lower-cases them silently, SPIFFE-ID §2.1 and §2.4
allow only lower case), IDs over 2048 bytes (§2.3), trust domains over 255 bytes, and - for
workload identities - IDs without a path (X509-SVID §3.1 requires a path on a leaf SVID).
"""

from __future__ import annotations

from spiffe import SpiffeId
from spiffe.errors import ArgumentError
from spiffe.spiffe_id.spiffe_id import SpiffeIdError as _LibSpiffeIdError

from sidecar.errors import SpiffeIdError

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "parse_spiffe_id"]

MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_SCHEME = "spiffe://"


def parse_spiffe_id(value: str, *, require_path: bool = True) -> SpiffeId:
    """Parse ``value`` as a SPIFFE ID, strictly.

    Args:
        value: e.g. ``"spiffe://example.org/ns/agents/sa/reporter"``.
        require_path: reject the trust-domain-only form ``spiffe://example.org``.

    Returns:
        The parsed :class:`spiffe.SpiffeId`; ``str()`` of it equals ``value``.

    Raises:
        SpiffeIdError: with a message that says which rule was broken.
    """
    if not isinstance(value, str):
        raise SpiffeIdError("SPIFFE ID must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise SpiffeIdError(f"SPIFFE ID longer than {MAX_ID_BYTES} bytes (SPIFFE-ID §2.3)")
    if not value.startswith(_SCHEME):
        raise SpiffeIdError("SPIFFE ID must start with 'spiffe://' in lower case (SPIFFE-ID §2)")
    rest = value[len(_SCHEME) :]
    trust_domain = rest.split("/", 1)[0]
    if len(trust_domain.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain longer than {MAX_TRUST_DOMAIN_BYTES} bytes (SPIFFE-ID §2.1)")
    if trust_domain != trust_domain.lower():
        raise SpiffeIdError("trust domain must be lower case (SPIFFE-ID §2.1)")
    try:
        parsed = SpiffeId(value)
    except (_LibSpiffeIdError, ArgumentError, ValueError) as exc:
        raise SpiffeIdError(str(exc)) from None
    if str(parsed) != value:
        raise SpiffeIdError("SPIFFE ID is not in canonical form (SPIFFE-ID §2)")
    if require_path and not parsed.path:
        raise SpiffeIdError("a workload SPIFFE ID needs a path (X509-SVID §3.1)")
    return parsed
