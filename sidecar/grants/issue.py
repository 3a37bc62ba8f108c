"""Issuing grants: root grants (``agent-authz task sign``) and delegation (``POST /v1/tasks/{id}/delegate``).

A delegation is planned here (the child's rules, the attenuation check) and signed here; the budget
it reserves from the parent is the runtime's business (:mod:`sidecar.runtime.tasks`), so this module
knows nothing of compiled tasks or call counters.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sidecar.config.durations import parse_duration
from sidecar.config.schema import EgressRuleSpec, QuarantineRuleSpec, Sensitivity, SpiffeIdStr, TaskSpec
from sidecar.grants import codec
from sidecar.grants.attenuation import check_attenuation, host_within, inherit, rule_within
from sidecar.grants.model import GRANT_TYP, Grant, GrantCode, GrantError
from sidecar.grants.verify import task_spec_from_claims
from sidecar.identity.state import Svid

__all__ = ["Delegation", "DelegationRequest", "grant_payload", "plan_delegation", "sign_delegation", "sign_root_grant"]


class DelegationRequest(BaseModel):
    """Body of ``POST /v1/tasks/{id}/delegate``.

    Attributes:
        subject: the sub-agent's SPIFFE ID.
        ttl: lifetime (e.g. ``"5m"``); the grant may not outlive its parent.
        name: suffix of the child task id (``<parent id>/<name>``); random when omitted.
        purpose: defaults to the parent's.
        max_calls: task-wide budget (required when the parent's is limited); reserved from the parent.
        max_sensitivity: the child's sensitivity limit (at most the parent's; default the parent's).
        quarantine: the child's anomaly rule (at least as strict as the parent's; default the parent's).
        egress: the narrower rules (each must lie within a parent rule).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: SpiffeIdStr
    ttl: Annotated[float, BeforeValidator(parse_duration)] = Field(gt=0)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    purpose: str | None = Field(default=None, min_length=1, max_length=1024)
    max_calls: int | None = Field(default=None, ge=0)
    max_sensitivity: Sensitivity | None = None
    quarantine: QuarantineRuleSpec | None = None
    egress: list[EgressRuleSpec] = Field(min_length=1)


def grant_payload(
    spec: TaskSpec,
    *,
    issuer: str,
    now: int,
    not_before: int,
    expires_at: int,
    txn: str,
    ancestors: list[str],
    parent: str | None,
) -> dict[str, Any]:
    """The JWS payload of a grant for ``spec`` (see :mod:`sidecar.grants.model`)."""
    task: dict[str, Any] = {
        "purpose": spec.purpose,
        "egress": [rule.model_dump(mode="json", exclude_none=True, exclude_defaults=True) for rule in spec.egress],
    }
    if spec.on_behalf_of is not None:
        task["on_behalf_of"] = spec.on_behalf_of
    if spec.max_calls is not None:
        task["max_calls"] = spec.max_calls
    if spec.max_sensitivity is not None:
        task["max_sensitivity"] = spec.max_sensitivity
    if spec.quarantine is not None:
        task["quarantine"] = spec.quarantine.model_dump(mode="json")
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": spec.agent,
        "jti": spec.id,
        "txn": txn,
        "iat": now,
        "nbf": not_before,
        "exp": expires_at,
        "task": task,
        "ancestors": ancestors,
    }
    if parent is not None:
        payload["parent"] = parent
    return payload


def sign_root_grant(spec: TaskSpec, key: PrivateKeyTypes, *, kid: str, issuer: str, now: float) -> str:
    """Sign ``spec`` as a root grant with a root issuer key (``kid``).

    Validity: ``not_before`` (default now) to ``expires_at``, or ``ttl`` from ``not_before``/now.

    Raises:
        GrantError: the task has neither ``expires_at`` nor ``ttl`` in the future.
    """
    start = int(spec.not_before.timestamp()) if spec.not_before is not None else int(now)
    if spec.expires_at is not None:
        end = int(spec.expires_at.timestamp())
    else:
        assert spec.ttl is not None
        end = start + int(spec.ttl)
    if end <= now:
        raise GrantError(GrantCode.EXPIRED, "the task would already be expired")
    payload = grant_payload(
        spec, issuer=issuer, now=int(now), not_before=start, expires_at=end, txn=spec.id, ancestors=[], parent=None
    )
    token = codec.sign(payload, key, typ=GRANT_TYP, kid=kid)
    task_spec_from_claims(payload)  # what we sign must verify
    return token


@dataclass(frozen=True, slots=True)
class Delegation:
    """A delegation that passed every check, not yet signed.

    Attributes:
        payload: the child grant's JWS payload (:func:`grant_payload`).
        child: the child task as it will verify.
        holders: child rule index -> index of the parent rule that holds it.
    """

    payload: dict[str, Any]
    child: TaskSpec
    holders: Mapping[int, int]


def plan_delegation(
    grant: Grant,
    request: DelegationRequest,
    *,
    issuer: str,
    revoked: bool,
    window: tuple[float, float],
    now: float,
    max_depth: int,
    remaining: Callable[[int | None], int | None],
) -> Delegation:
    """Check a sub-grant of ``grant`` to ``request.subject`` and build its payload.

    Args:
        grant: the parent grant.
        request: what to delegate.
        issuer: the delegating agent's SPIFFE ID (the SVID :func:`sign_delegation` signs with).
        revoked: the parent task is revoked.
        window: the parent task's ``(not_before, expires_at)``, POSIX seconds.
        now: POSIX seconds.
        max_depth: ``grants.max_depth``.
        remaining: calls left under a parent rule (by index; ``None``: the task-wide budget), ``None``
            when unlimited - a child may not be given more.

    Raises:
        GrantError: ``grant_not_delegable`` (revoked, not currently valid, too deep),
            ``grant_widening`` (an :class:`~sidecar.grants.attenuation.AttenuationError` naming the field).
    """
    if revoked:
        raise GrantError(GrantCode.NOT_DELEGABLE, "the task is revoked")
    not_before, expires_at = window
    if not not_before <= now < expires_at:
        raise GrantError(GrantCode.NOT_DELEGABLE, "the task is not currently valid")
    if grant.depth + 1 > max_depth:
        raise GrantError(GrantCode.NOT_DELEGABLE, f"a delegation would exceed max_depth {max_depth}")
    start, end = int(now), int(now + request.ttl)
    if end > expires_at:
        raise GrantError(GrantCode.WIDENING, "ttl: the delegated task would outlive its parent")
    child_id = f"{grant.id}/{request.name or secrets.token_hex(4)}"
    rules = []
    for rule in request.egress:  # take unset audience/scope/token from the parent rule that holds it
        holder = next((p for p in grant.spec.egress if rule_within(inherit(rule, p), p) is None), None)
        if holder is None:  # no parent rule holds it: inherit from the closest, so the error names the real widening
            holder = next((p for p in grant.spec.egress if host_within(rule.host, p.host)), None)
        rules.append(inherit(rule, holder) if holder is not None else rule)
    payload = grant_payload(
        TaskSpec.model_validate(
            {
                "id": child_id,
                "agent": request.subject,
                "purpose": request.purpose or grant.spec.purpose,
                "on_behalf_of": grant.spec.on_behalf_of,
                "max_calls": request.max_calls,
                "max_sensitivity": request.max_sensitivity or grant.spec.max_sensitivity,
                "quarantine": (request.quarantine or grant.spec.quarantine),
                "expires_at": _iso(end),
                "not_before": _iso(start),
                "egress": [r.model_dump(exclude_none=True) for r in rules],
            }
        ),
        issuer=issuer,
        now=start,
        not_before=start,
        expires_at=end,
        txn=grant.txn,
        ancestors=[*grant.ancestors, grant.id],
        parent=grant.token,
    )
    child = task_spec_from_claims(payload)
    holders = check_attenuation(
        grant.spec,
        child,
        parent_window=(grant.not_before, grant.expires_at),
        child_window=(start, end),
        remaining=remaining,
    )
    return Delegation(payload, child, holders)


def sign_delegation(delegation: Delegation, svid: Svid) -> str:
    """The compact JWS of ``delegation``, signed with this agent's X.509-SVID (``x5c``, RFC 7515 §4.1.6).

    Raises:
        GrantError: ``grant_wrong_signer``: ``svid`` is not the issuer the delegation was planned for.
    """
    if svid.spiffe_id != delegation.payload["iss"]:
        raise GrantError(GrantCode.WRONG_SIGNER, f"planned for {delegation.payload['iss']}, signed by {svid.spiffe_id}")
    return codec.sign(delegation.payload, svid.private_key, typ=GRANT_TYP, x5c=list(svid.chain))


def _iso(timestamp: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()
