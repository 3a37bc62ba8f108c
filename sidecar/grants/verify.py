"""Verify a grant and its whole chain, offline.

For each link, from the root down: the signature (``kid`` of a root issuer key, or ``x5c`` chaining
to the bundle of the signer's trust domain); a root grant signed by a root issuer; a delegated
grant signed by its parent's subject; ancestors and ``txn`` consistent with the parent; the depth
within ``max_depth``; and attenuation (:mod:`sidecar.grants.attenuation`). Expiry is not a reason
to refuse a grant here: an expired grant compiles to an expired task, so calls under it are denied
with ``task_expired``. Callers check that the subject is their own agent.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pydantic import ValidationError

from sidecar.config.loader import format_loc
from sidecar.config.schema import TaskSpec
from sidecar.grants import codec
from sidecar.grants.attenuation import check_attenuation
from sidecar.grants.model import GRANT_TYP, Grant, GrantCode, GrantError
from sidecar.identity.x509svid import X509SvidVerifier

__all__ = ["GrantVerifier", "task_spec_from_claims"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")


def _int(payload: Mapping[str, Any], claim: str) -> int:
    value = payload.get(claim)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GrantError(GrantCode.MALFORMED, f"claim {claim!r} must be an integer NumericDate")
    return value


def task_spec_from_claims(payload: Mapping[str, Any]) -> TaskSpec:
    """The :class:`TaskSpec` a grant payload declares (validated like a task in ``sidecar.yaml``).

    Raises:
        GrantError: ``grant_malformed`` naming the invalid field.
    """
    task = payload.get("task")
    if not isinstance(task, dict):
        raise GrantError(GrantCode.MALFORMED, "claim 'task' must be an object")
    nbf, exp = _int(payload, "nbf"), _int(payload, "exp")
    body = {
        "id": payload.get("jti"),
        "agent": payload.get("sub"),
        "purpose": task.get("purpose"),
        "on_behalf_of": task.get("on_behalf_of"),
        "max_calls": task.get("max_calls"),
        "max_sensitivity": task.get("max_sensitivity"),
        "quarantine": task.get("quarantine"),
        "egress": task.get("egress", []),
        "not_before": dt.datetime.fromtimestamp(nbf, dt.UTC),
        "expires_at": dt.datetime.fromtimestamp(exp, dt.UTC),
    }
    unknown = set(task) - {"purpose", "on_behalf_of", "max_calls", "max_sensitivity", "quarantine", "egress"}
    if unknown:
        raise GrantError(GrantCode.MALFORMED, f"unknown task fields {sorted(unknown)}")
    try:
        spec = TaskSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise GrantError(GrantCode.MALFORMED, f"{format_loc(first['loc'])}: {first['msg']}") from None
    for index, rule in enumerate(spec.egress):
        if rule.credential is not None and not isinstance(rule.credential, str):
            raise GrantError(
                GrantCode.MALFORMED, f"egress[{index}].credential: grants name credentials, never carry them"
            )
    return spec


class GrantVerifier:
    """Verifies grants against root issuers and trust bundles.

    Args:
        root_keys: ``kid`` -> public key of root issuer keys.
        root_ids: SPIFFE IDs allowed to sign root grants with their X.509-SVID.
        svids: verifier over the trust bundles (``None`` without an identity source: only
            ``kid``-signed root grants can then verify).
        max_depth: the longest delegation chain accepted (a root grant has depth 0).
    """

    def __init__(
        self,
        *,
        root_keys: Mapping[str, PublicKeyTypes],
        root_ids: frozenset[str],
        svids: X509SvidVerifier | None,
        max_depth: int,
    ) -> None:
        self.root_keys = dict(root_keys)
        self.root_ids = root_ids
        self.svids = svids
        self.max_depth = max_depth

    def is_root_signer(self, signer: str) -> bool:
        """Whether ``signer`` (as :func:`codec.verify` reports it) is a root issuer."""
        return signer.startswith("key:") or signer in self.root_ids

    def verify(self, token: str, *, now: float) -> Grant:
        """Verify ``token`` and its ancestors.

        Raises:
            GrantError: ``grant_malformed``, ``grant_bad_header``, ``grant_untrusted_signer``,
                ``grant_bad_signature``, ``grant_not_root_issuer``, ``grant_wrong_signer``,
                ``grant_broken_chain``, ``grant_too_deep`` or ``grant_widening``.
        """
        return self._verify(token, now, 0)

    def _verify(self, token: str, now: float, level: int) -> Grant:
        if level > self.max_depth:
            raise GrantError(GrantCode.TOO_DEEP, f"the delegation chain is deeper than max_depth {self.max_depth}")
        signer, payload = codec.verify(token, typ=GRANT_TYP, root_keys=self.root_keys, svids=self.svids, now=now)
        grant_id, subject, txn = payload.get("jti"), payload.get("sub"), payload.get("txn")
        if not isinstance(grant_id, str) or not _ID.match(grant_id):
            raise GrantError(GrantCode.MALFORMED, "jti must be a task id")
        if not isinstance(txn, str) or not _ID.match(txn):
            raise GrantError(GrantCode.MALFORMED, "txn must be a task id")
        ancestors = payload.get("ancestors", [])
        if not isinstance(ancestors, list) or not all(isinstance(a, str) for a in ancestors):
            raise GrantError(GrantCode.MALFORMED, "ancestors must be a list of ids")
        if len(ancestors) > self.max_depth:
            raise GrantError(GrantCode.TOO_DEEP, f"depth {len(ancestors)} is over max_depth {self.max_depth}")
        spec = task_spec_from_claims(payload)
        assert isinstance(subject, str)  # TaskSpec validated it as a SPIFFE ID
        window = (float(_int(payload, "nbf")), float(_int(payload, "exp")))
        parent_token = payload.get("parent")
        parent = None
        if parent_token is None:
            if not self.is_root_signer(signer):
                raise GrantError(GrantCode.NOT_ROOT_ISSUER, f"{signer} may not sign root grants")
            if ancestors or txn != grant_id:
                raise GrantError(GrantCode.BROKEN_CHAIN, "a root grant has no ancestors and its own id as txn")
        else:
            if not isinstance(parent_token, str):
                raise GrantError(GrantCode.MALFORMED, "parent must be a compact JWS")
            parent = self._verify(parent_token, now, level + 1)
            if signer != parent.subject:
                raise GrantError(
                    GrantCode.WRONG_SIGNER, f"signed by {signer}, but only {parent.subject} may delegate it"
                )
            if tuple(ancestors) != (*parent.ancestors, parent.id) or txn != parent.txn or grant_id in ancestors:
                raise GrantError(GrantCode.BROKEN_CHAIN, "ancestors or txn do not continue the parent's chain")
            check_attenuation(
                parent.spec, spec, parent_window=(parent.not_before, parent.expires_at), child_window=window
            )
        return Grant(
            id=grant_id,
            subject=subject,
            signer=signer,
            txn=txn,
            ancestors=tuple(ancestors),
            not_before=window[0],
            expires_at=window[1],
            spec=spec,
            parent=parent,
            token=token,
        )
