"""Trust bundles, one per trust domain (SPIFFE Trust Domain and Bundle; SPIFFE Federation).

Verification always uses the bundle of the trust domain named in the SPIFFE ID being verified,
never a pooled store: a CA of ``partner.example`` can never vouch for an ID in ``example.org``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["TrustBundles"]


@dataclass(frozen=True, slots=True)
class TrustBundles:
    """X.509 and JWT authorities by trust domain name.

    Attributes:
        x509: trust domain -> X.509 authorities (root or intermediate CA certificates).
        jwt: trust domain -> ``kid`` -> public key of a JWT-SVID signer.
    """

    x509: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    jwt: Mapping[str, Mapping[str, PublicKeyTypes]] = field(default_factory=dict)

    @property
    def trust_domains(self) -> frozenset[str]:
        """Every trust domain with an X.509 or JWT bundle."""
        return frozenset(self.x509) | frozenset(self.jwt)

    def fingerprint(self) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
        """A comparable summary (trust domain, certificate fingerprints) for change detection."""
        from cryptography.hazmat.primitives import hashes

        return tuple(
            (td, tuple(sorted(cert.fingerprint(hashes.SHA256()) for cert in certs)))
            for td, certs in sorted(self.x509.items())
        ) + tuple((f"jwt:{td}", tuple(sorted(k.encode() for k in keys))) for td, keys in sorted(self.jwt.items()))
