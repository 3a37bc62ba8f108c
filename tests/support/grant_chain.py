"""Grant chains made in memory: a trust domain, a root issuer key, SVIDs, root grants and delegations.

The same product functions a sidecar uses (``sign_root_grant``, ``plan_delegation``,
``sign_delegation``), without running one.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from sidecar.config.schema import TaskSpec
from sidecar.grants.issue import DelegationRequest, plan_delegation, sign_delegation, sign_root_grant
from sidecar.grants.model import Grant
from sidecar.grants.revocations import sign_revocations
from sidecar.grants.verify import GrantVerifier
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.devca import DevCA
from sidecar.identity.local_svid import Svid, validate_local_svid
from sidecar.identity.x509svid import X509SvidVerifier
from sidecar.tokens.keys import SigningKey, generate_private_key_pem, load_signing_key

__all__ = ["Chain", "root_task"]


def root_task(task_id: str, agent: str, host: str = "api.internal") -> dict[str, Any]:
    """A root task for ``agent`` allowing ``GET http://host/v1/*``."""
    return {
        "id": task_id,
        "agent": agent,
        "purpose": "test",
        "on_behalf_of": "user:jane@example.com",
        "ttl": "1h",
        "egress": [{"name": "read", "host": host, "methods": ["GET"], "paths": ["/v1/*"]}],
    }


class Chain:
    """A trust domain (``ca``) and a root task issuer (``issuer``)."""

    def __init__(self, ca: DevCA, issuer: SigningKey | None = None) -> None:
        self.ca = ca
        self.issuer = issuer or load_signing_key(generate_private_key_pem(), "ES256", file="issuer", field="")
        self.svids: dict[str, Svid] = {}

    def svid(self, spiffe_id: str) -> Svid:
        """The (cached) X.509-SVID of ``spiffe_id``."""
        if spiffe_id not in self.svids:
            chain, key = self.ca.issue_x509(spiffe_id)
            bundles = TrustBundles({self.ca.trust_domain: (self.ca.ca_cert,)})
            self.svids[spiffe_id] = validate_local_svid(chain, key, bundles, now=time.time())
        return self.svids[spiffe_id]

    def verifier(self, max_depth: int = 3) -> GrantVerifier:
        """A verifier trusting this issuer and this trust domain's bundle."""
        bundles = TrustBundles({self.ca.trust_domain: (self.ca.ca_cert,)})
        return GrantVerifier(
            root_keys={self.issuer.kid: self.issuer.private_key.public_key()},
            root_ids=frozenset(),
            svids=X509SvidVerifier(bundles),
            max_depth=max_depth,
        )

    def root(self, task: dict[str, Any], *, now: float | None = None) -> str:
        """A root grant of ``task`` signed by the root issuer."""
        spec = TaskSpec.model_validate(copy.deepcopy(task))
        return sign_root_grant(
            spec, self.issuer.private_key, kid=self.issuer.kid, issuer="test-issuer", now=now or time.time()
        )

    def grant(self, token: str) -> Grant:
        """``token`` verified."""
        return self.verifier().verify(token, now=time.time())

    def delegate(self, parent: str, subject: str, name: str, **request: Any) -> str:
        """A delegation of ``parent`` to ``subject``, signed with the parent subject's SVID."""
        grant = self.grant(parent)
        body = {
            "subject": subject,
            "ttl": "10m",
            "name": name,
            "egress": [{"host": grant.spec.egress[0].host, "methods": ["GET"], "paths": ["/v1/*"]}],
            **request,
        }
        delegation = plan_delegation(
            grant,
            DelegationRequest.model_validate(body),
            issuer=grant.subject,
            revoked=False,
            window=(grant.not_before, grant.expires_at),
            now=time.time(),
            max_depth=3,
            remaining=lambda _: None,
        )
        return sign_delegation(delegation, self.svid(grant.subject))

    def revocation_by(self, spiffe_id: str, *ids: str, issued_at: int | None = None) -> str:
        """A revocation list of ``ids`` signed with ``spiffe_id``'s SVID."""
        svid = self.svid(spiffe_id)
        return sign_revocations(
            ids, svid.private_key, issuer=spiffe_id, issued_at=issued_at or int(time.time()), x5c=list(svid.chain)
        )

    def root_revocation(self, *ids: str) -> str:
        """A revocation list of ``ids`` signed by the root issuer key."""
        return sign_revocations(
            ids, self.issuer.private_key, issuer="test-issuer", issued_at=int(time.time()), kid=self.issuer.kid
        )
