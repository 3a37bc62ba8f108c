"""Issuing grants: root grants (``agent-authz task sign``) and delegation (``POST /v1/tasks/{id}/delegate``)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sidecar.config.durations import parse_duration
from sidecar.config.schema import EgressRuleSpec, SpiffeIdStr, TaskSpec
from sidecar.grants import codec
from sidecar.grants.attenuation import check_attenuation, host_within, inherit, rule_within
from sidecar.grants.model import GRANT_TYP, GrantError
from sidecar.grants.verify import task_spec_from_claims
from sidecar.identity.state import Svid
from sidecar.policy.budget import BudgetKey, BudgetLedger
from sidecar.policy.model import Task

__all__ = ["DelegationRequest", "delegate", "grant_payload", "sign_root_grant"]


class DelegationRequest(BaseModel):
    """Body of ``POST /v1/tasks/{id}/delegate``.

    Attributes:
        subject: the sub-agent's SPIFFE ID.
        ttl: lifetime (e.g. ``"5m"``); the grant may not outlive its parent.
        name: suffix of the child task id (``<parent id>/<name>``); random when omitted.
        purpose: defaults to the parent's.
        max_calls: task-wide budget (required when the parent's is limited); reserved from the parent.
        egress: the narrower rules (each must lie within a parent rule).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: SpiffeIdStr
    ttl: Annotated[float, BeforeValidator(parse_duration)] = Field(gt=0)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    purpose: str | None = Field(default=None, min_length=1, max_length=1024)
    max_calls: int | None = Field(default=None, ge=0)
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
        raise GrantError("grant_expired", "the task would already be expired")
    payload = grant_payload(
        spec, issuer=issuer, now=int(now), not_before=start, expires_at=end, txn=spec.id, ancestors=[], parent=None
    )
    token = codec.sign(payload, key, typ=GRANT_TYP, kid=kid)
    task_spec_from_claims(payload)  # what we sign must verify
    return token


def delegate(
    parent: Task,
    request: DelegationRequest,
    *,
    svid: Svid,
    budgets: BudgetLedger,
    now: float,
    max_depth: int,
) -> tuple[str, TaskSpec]:
    """Issue a sub-grant of ``parent`` to ``request.subject``, signed with this agent's X.509-SVID.

    Budget given to the child is reserved from the parent's (task-wide and per rule).

    Returns:
        ``(compact JWS, child TaskSpec)``.

    Raises:
        GrantError: ``grant_not_delegable`` (not a grant, revoked, expired, too deep),
            ``grant_widening`` (an :class:`~sidecar.grants.attenuation.AttenuationError` naming the field).
    """
    grant = parent.grant
    if grant is None:
        raise GrantError("grant_not_delegable", "only tasks that came from a signed grant can be delegated")
    if parent.revoked:
        raise GrantError("grant_not_delegable", "the task is revoked")
    if not parent.not_before <= now < parent.expires_at:
        raise GrantError("grant_not_delegable", "the task is not currently valid")
    if grant.depth + 1 > max_depth:
        raise GrantError("grant_not_delegable", f"a delegation would exceed max_depth {max_depth}")
    start, end = int(now), int(now + request.ttl)
    if end > parent.expires_at:
        raise GrantError("grant_widening", "ttl: the delegated task would outlive its parent")
    child_id = f"{parent.id}/{request.name or secrets.token_hex(4)}"
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
                "purpose": request.purpose or parent.purpose,
                "on_behalf_of": parent.on_behalf_of,
                "max_calls": request.max_calls,
                "expires_at": _iso(end),
                "not_before": _iso(start),
                "egress": [r.model_dump(exclude_none=True) for r in rules],
            }
        ),
        issuer=svid.spiffe_id,
        now=start,
        not_before=start,
        expires_at=end,
        txn=grant.txn,
        ancestors=[*grant.ancestors, grant.id],
        parent=grant.token,
    )
    child = task_spec_from_claims(payload)

    def key(index: int | None) -> tuple[BudgetKey, int | None]:
        if index is None:
            return (parent.id, ""), parent.max_calls
        rule = parent.rules[index]
        return (parent.id, rule.budget_key), rule.max_calls

    def remaining(index: int | None) -> int | None:
        budget_key, limit = key(index)
        return None if limit is None else limit - budgets.used(budget_key)

    holders = check_attenuation(
        grant.spec,
        child,
        parent_window=(grant.not_before, grant.expires_at),
        child_window=(start, end),
        remaining=remaining,
    )
    reservations: dict[BudgetKey, tuple[int, int | None]] = {}
    if child.max_calls is not None and parent.max_calls is not None:
        reservations[key(None)[0]] = (child.max_calls, parent.max_calls)
    for c_index, p_index in holders.items():
        budget_key, limit = key(p_index)
        amount = child.egress[c_index].max_calls
        if limit is not None and amount is not None:
            spent, _ = reservations.get(budget_key, (0, limit))
            reservations[budget_key] = (spent + amount, limit)
    if not budgets.try_reserve(reservations):
        raise GrantError("grant_widening", "max_calls: the parent's budget left is smaller than the delegated budgets")
    token = codec.sign(payload, svid.private_key, typ=GRANT_TYP, x5c=list(svid.chain))
    return token, child


def _iso(timestamp: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()
