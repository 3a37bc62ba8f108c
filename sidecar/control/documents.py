"""The signed documents of continuous verification: ladder actions, approvals and operator tokens.

Every step an operator takes is a compact JWS, signed like a root grant or a revocation list - with
a root issuer key (``kid``, ``grants.root_issuers[].jwks``) or an X.509-SVID (``x5c``) whose SPIFFE
ID the sidecar trusts - and verified by the sidecar (:func:`sidecar.grants.codec.verify`). So the
channel that carries it does not have to be out of the agent's reach: the agent holds no such key,
and what it can do with a document it sees (replay it) is neutralised by the document's own rules.

* **Action** (``typ: agent-authz-action+jwt``): ``{"iss", "iat", "jti", "action": "freeze" |
  "unfreeze" | "kill", "target": "agent:<SPIFFE ID>" | "task:<id>" | "subtree:<id>", "at": seconds
  (milliseconds precision), "reason", "evidence": [decision ids]}``. Kept by ``jti``: a replay is the
  same action again. Ordered by ``at``: an unfreeze lifts the freezes of its target made before it,
  never a later one, so replaying an old unfreeze changes nothing.
* **Approval** (``typ: agent-authz-approval+jwt``): ``{"iss", "iat", "exp", "jti", "aud": <the
  agent's SPIFFE ID>, "approval_id", "ttl"}`` - valid at most :data:`MAX_DOCUMENT_LIFETIME`; the
  approval it grants is single-use whatever happens to the document.
* **Operator token** (``typ: agent-authz-operator+jwt``): ``{"iss", "iat", "exp", "jti", "aud"}``,
  valid at most :data:`MAX_OPERATOR_LIFETIME`: the decision viewer's approve button sends it as
  ``Authorization: Bearer``; only its holder (the operator, e.g. over ``kubectl port-forward``) can
  approve there.
"""

from __future__ import annotations

import enum
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sidecar.errors import AgentAuthzError, ErrorCode, SpiffeIdError
from sidecar.grants import codec
from sidecar.grants.model import GrantError
from sidecar.grants.verify import GrantVerifier
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = [
    "ACTION_TYP",
    "APPROVAL_TYP",
    "MAX_DOCUMENT_LIFETIME",
    "MAX_OPERATOR_LIFETIME",
    "OPERATOR_TYP",
    "Action",
    "ActionKind",
    "ControlCode",
    "ControlError",
    "Target",
    "TargetKind",
    "sign_action",
    "sign_approval",
    "sign_operator_token",
    "verify_action",
    "verify_approval",
    "verify_operator_token",
]

ACTION_TYP = "agent-authz-action+jwt"
APPROVAL_TYP = "agent-authz-approval+jwt"
OPERATOR_TYP = "agent-authz-operator+jwt"
MAX_DOCUMENT_LIFETIME = 3600
"""Seconds an approval document may be valid (``exp - iat``)."""
MAX_OPERATOR_LIFETIME = 12 * 3600
"""Seconds an operator token may be valid (``exp - iat``)."""
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_MAX_EVIDENCE = 1000


class ControlCode(enum.StrEnum):
    """Why an action, an approval or an operator token was refused: the ``detail`` of
    :class:`ControlError` and the ``error`` of the control API's answers. Never rename a value."""

    MALFORMED = "control_malformed"
    """Not a compact JWS of the expected type, or a claim is missing or has the wrong shape."""
    UNTRUSTED_SIGNER = "control_untrusted_signer"
    """The signature does not verify against a root issuer key or a trusted X.509-SVID."""
    NOT_AUTHORIZED = "control_not_authorized"
    """The signer may not do this (an unfreeze needs a root issuer; an approval a root issuer or an
    ``approvals.approvers`` SPIFFE ID; an action on an agent other than the signer needs a root issuer)."""
    EXPIRED = "control_expired"
    """The document's ``exp`` has passed, or it is valid for longer than allowed."""
    WRONG_AUDIENCE = "control_wrong_audience"
    """An approval or operator token for another agent's sidecar."""
    UNKNOWN_APPROVAL = "control_unknown_approval"
    """No call waits for approval under this id here (never seen, or forgotten after ``approvals.pending_ttl``)."""
    APPROVAL_CLOSED = "control_approval_closed"
    """The approval was already granted, used, expired, or replaced after a policy change."""


class ControlError(AgentAuthzError):
    """An action, approval or operator token was refused; ``detail`` is a :class:`ControlCode`."""

    code = ErrorCode.CONTROL_REFUSED

    def __init__(self, detail: ControlCode, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


class ActionKind(enum.StrEnum):
    """A step of the ladder."""

    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    KILL = "kill"


class TargetKind(enum.StrEnum):
    """What an action names."""

    AGENT = "agent"
    """Every task of this SPIFFE ID, and everything delegated below them."""
    TASK = "task"
    """This task only (not what it delegated)."""
    SUBTREE = "subtree"
    """This task and everything delegated below it."""


@dataclass(frozen=True, slots=True)
class Target:
    """What an action names: ``agent:<SPIFFE ID>``, ``task:<id>`` or ``subtree:<id>``."""

    kind: TargetKind
    id: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """``agent:ID``, ``task:ID``, ``subtree:ID``; a bare ``spiffe://`` ID is an agent, a bare task
        id a subtree.

        Raises:
            ControlError: ``control_malformed``.
        """
        kind_text, sep, rest = text.partition(":")
        if sep and kind_text in TargetKind.__members__.values():
            kind, value = TargetKind(kind_text), rest
        elif text.startswith("spiffe://"):
            kind, value = TargetKind.AGENT, text
        else:
            kind, value = TargetKind.SUBTREE, text
        if kind is TargetKind.AGENT:
            try:
                parse_spiffe_id(value)
            except SpiffeIdError as exc:
                raise ControlError(ControlCode.MALFORMED, f"target {text!r}: {exc}") from None
        elif not _TASK_ID.match(value):
            raise ControlError(ControlCode.MALFORMED, f"target {text!r}: not a task id")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class Action:
    """A ladder action this sidecar knows (verified, or its own).

    Attributes:
        action_id: the document's ``jti`` (unique; a replay is the same action).
        kind / target: what it does to what.
        at: when it was decided, POSIX seconds (its place in the order of actions).
        signer: ``key:<kid>`` or a SPIFFE ID (this sidecar's agent for its own quarantines).
        root: the signer is a root issuer.
        reason: free text (at most 256 characters).
        evidence: decision ids behind it (a quarantine's: the records that tripped it).
        source: where it came from: ``own`` (this sidecar's quarantine), ``api``, ``file:<path>``.
        token: the compact JWS (``""`` for an own action without an identity to sign it).
    """

    action_id: str
    kind: ActionKind
    target: Target
    at: float
    signer: str
    root: bool
    reason: str = ""
    evidence: tuple[str, ...] = ()
    source: str = "api"
    token: str = field(default="", repr=False)

    def record(self) -> dict[str, object]:
        """What a control record says about it."""
        return {
            "kind": self.kind.value,
            "target": str(self.target),
            "by": self.signer,
            "root": self.root,
            "action_id": self.action_id,
            "at": self.at,
            "reason": self.reason,
            "evidence": list(self.evidence),
            "source": self.source,
        }


def _base(issuer: str, now: float, lifetime: float | None, jti: str | None = None) -> dict[str, Any]:
    iat = int(now)
    claims: dict[str, Any] = {"iss": issuer, "iat": iat, "jti": jti or secrets.token_urlsafe(16)}
    if lifetime is not None:
        claims["exp"] = iat + max(1, math.ceil(lifetime))
    return claims


def sign_action(
    kind: ActionKind,
    target: Target,
    key: PrivateKeyTypes,
    *,
    issuer: str,
    at: float,
    reason: str = "",
    evidence: Iterable[str] = (),
    kid: str | None = None,
    x5c: list[x509.Certificate] | None = None,
    jti: str | None = None,
) -> str:
    """A signed action (exactly one of ``kid``: a root issuer key, or ``x5c``: an X.509-SVID chain);
    ``jti`` is random unless given."""
    payload = _base(issuer, at, None, jti)
    payload.update(action=kind.value, target=str(target), at=round(at, 3), reason=reason[:256], evidence=list(evidence))
    return codec.sign(payload, key, typ=ACTION_TYP, kid=kid, x5c=x5c)


def _verify(token: str, typ: str, verifier: GrantVerifier, now: float) -> tuple[str, dict[str, Any]]:
    try:
        return codec.verify(token.strip(), typ=typ, root_keys=verifier.root_keys, svids=verifier.svids, now=now)
    except GrantError as exc:
        code = (
            ControlCode.MALFORMED
            if exc.detail in ("grant_malformed", "grant_bad_header")
            else ControlCode.UNTRUSTED_SIGNER
        )
        raise ControlError(code, str(exc).split(": ", 1)[-1]) from None


def verify_action(token: str, *, verifier: GrantVerifier, now: float, source: str) -> Action:
    """Verify a signed action (its signature and shape; authority over a target is the ladder's).

    Raises:
        ControlError: ``control_malformed``, ``control_untrusted_signer``, or ``control_not_authorized``
            (an ``unfreeze`` not signed by a root issuer).
    """
    signer, payload = _verify(token, ACTION_TYP, verifier, now)
    jti, kind, target, at = payload.get("jti"), payload.get("action"), payload.get("target"), payload.get("at")
    if not isinstance(jti, str) or not _ID.match(jti):
        raise ControlError(ControlCode.MALFORMED, "jti must be 8-64 characters of A-Z a-z 0-9 _ -")
    if kind not in ActionKind.__members__.values():
        raise ControlError(ControlCode.MALFORMED, "action must be freeze, unfreeze or kill")
    if not isinstance(target, str):
        raise ControlError(ControlCode.MALFORMED, "target must be a string")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ControlError(ControlCode.MALFORMED, "at must be a number of seconds")
    reason, evidence = payload.get("reason", ""), payload.get("evidence", [])
    if not isinstance(reason, str) or not isinstance(evidence, list) or len(evidence) > _MAX_EVIDENCE:
        raise ControlError(ControlCode.MALFORMED, "reason must be a string and evidence a list")
    if not all(isinstance(item, str) and len(item) <= 128 for item in evidence):
        raise ControlError(ControlCode.MALFORMED, "evidence must be decision ids")
    root = verifier.is_root_signer(signer)
    action = Action(
        jti,
        ActionKind(str(kind)),
        Target.parse(target),
        float(at),
        signer,
        root,
        reason[:256],
        tuple(evidence),
        source,
        token.strip(),
    )
    if action.kind is ActionKind.UNFREEZE and not root:
        raise ControlError(ControlCode.NOT_AUTHORIZED, f"only a root issuer unfreezes ({signer} is not one)")
    return action


def _timed(payload: Mapping[str, Any], now: float, longest: int) -> None:
    iat, exp = payload.get("iat"), payload.get("exp")
    if not isinstance(iat, int) or isinstance(iat, bool) or not isinstance(exp, int) or isinstance(exp, bool):
        raise ControlError(ControlCode.MALFORMED, "iat and exp must be integer NumericDates")
    if exp <= now:
        raise ControlError(ControlCode.EXPIRED, "the document has expired")
    if exp - iat > longest or iat > now + 60:
        raise ControlError(ControlCode.EXPIRED, f"valid for more than {longest} s, or issued in the future")


def _approver(signer: str, verifier: GrantVerifier, approvers: frozenset[str]) -> None:
    if not verifier.is_root_signer(signer) and signer not in approvers:
        raise ControlError(ControlCode.NOT_AUTHORIZED, f"{signer} is neither a root issuer nor an approver")


def sign_approval(
    approval_id: str,
    key: PrivateKeyTypes,
    *,
    issuer: str,
    audience: str,
    ttl: float,
    now: float,
    kid: str | None = None,
    x5c: list[x509.Certificate] | None = None,
    lifetime: float = 300,
) -> str:
    """A signed approval of ``approval_id`` for ``ttl`` seconds, for the sidecar of ``audience``."""
    payload = _base(issuer, now, lifetime)
    payload.update(aud=audience, approval_id=approval_id, ttl=ttl)
    return codec.sign(payload, key, typ=APPROVAL_TYP, kid=kid, x5c=x5c)


def verify_approval(
    token: str, *, verifier: GrantVerifier, approvers: frozenset[str], audience: str, now: float
) -> tuple[str, str, float | None]:
    """Verify a signed approval.

    Returns:
        ``(signer, approval_id, ttl)``; ``ttl`` is ``None`` when the document names none.

    Raises:
        ControlError: ``control_malformed``, ``control_untrusted_signer``, ``control_not_authorized``,
            ``control_expired``, ``control_wrong_audience``.
    """
    signer, payload = _verify(token, APPROVAL_TYP, verifier, now)
    _timed(payload, now, MAX_DOCUMENT_LIFETIME)
    if payload.get("aud") != audience:
        raise ControlError(ControlCode.WRONG_AUDIENCE, f"the approval is for {payload.get('aud')!r}, not {audience}")
    _approver(signer, verifier, approvers)
    approval_id, ttl = payload.get("approval_id"), payload.get("ttl")
    if not isinstance(approval_id, str) or not _ID.match(approval_id):
        raise ControlError(ControlCode.MALFORMED, "approval_id must be an approval id")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 1e7):
        raise ControlError(ControlCode.MALFORMED, "ttl must be a positive number of seconds")
    return signer, approval_id, None if ttl is None else float(ttl)


def sign_operator_token(
    key: PrivateKeyTypes,
    *,
    issuer: str,
    audience: str,
    now: float,
    lifetime: float,
    kid: str | None = None,
    x5c: list[x509.Certificate] | None = None,
) -> str:
    """An operator token for the decision viewer of ``audience``'s sidecar, valid ``lifetime`` seconds."""
    payload = _base(issuer, now, min(lifetime, MAX_OPERATOR_LIFETIME))
    payload["aud"] = audience
    return codec.sign(payload, key, typ=OPERATOR_TYP, kid=kid, x5c=x5c)


def verify_operator_token(
    token: str, *, verifier: GrantVerifier, approvers: frozenset[str], audience: str, now: float
) -> str:
    """Verify an operator token; returns the operator (its signer).

    Raises:
        ControlError: as :func:`verify_approval`.
    """
    signer, payload = _verify(token, OPERATOR_TYP, verifier, now)
    _timed(payload, now, MAX_OPERATOR_LIFETIME)
    if payload.get("aud") != audience:
        raise ControlError(ControlCode.WRONG_AUDIENCE, f"the token is for {payload.get('aud')!r}, not {audience}")
    _approver(signer, verifier, approvers)
    return signer
