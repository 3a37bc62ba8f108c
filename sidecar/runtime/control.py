"""The control service: an operator's signed steps, taken on one :class:`~sidecar.runtime.active.Runtime`.

:mod:`sidecar.admin.control_api` is its HTTP face (``/v1/control/actions``, ``/v1/approvals``) and
the decision viewer's approve button calls :meth:`ControlService.approve_as`. Nothing here trusts the
caller: every step is a signed document (:mod:`sidecar.control.documents`) verified against the
root issuers and trust bundles of the active snapshot, so reaching these routes - as the agent can
- gives no power without a key the agent does not hold. Every step taken is a ``control`` record;
every refusal of a badly signed or unauthorised document too (``not_authorized``).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from sidecar.control.approvals import Approval
from sidecar.control.documents import (
    Action,
    ControlCode,
    ControlError,
    verify_action,
    verify_approval,
    verify_operator_token,
)
from sidecar.decision import Reason
from sidecar.runtime.active import Runtime

__all__ = ["ControlService", "LadderEntry"]

_log = structlog.get_logger("agent_authz.control")
_UNRECORDED = (ControlCode.UNKNOWN_APPROVAL, ControlCode.APPROVAL_CLOSED)


@dataclass(frozen=True, slots=True)
class LadderEntry:
    """A target and where it stands (``GET /v1/control/actions``)."""

    target: str
    state: str
    action: Action


class ControlService:
    """Takes signed ladder actions and approvals on ``runtime``.

    Args:
        runtime: the runtime whose ladder and approval book change.

    Attributes:
        runtime: as given.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def refused(self, exc: ControlError, what: str, path: str) -> ControlError:
        """Record a refused document (``not_authorized``, or ``bad_request`` when malformed); returns ``exc``."""
        if exc.detail in _UNRECORDED:
            return exc
        reason = Reason.BAD_REQUEST if exc.detail is ControlCode.MALFORMED else Reason.NOT_AUTHORIZED
        runtime = self.runtime
        decision = runtime.control_record(reason, detail=f"{what}: {exc}", method="POST", path=path[:256])
        _log.warning("control_refused", what=what, code=exc.detail, decision_id=decision.decision_id)
        runtime.record(decision)
        return exc

    def act(self, text: str) -> list[Action]:
        """Verify and honour signed actions (one compact JWS per line).

        Returns:
            The actions that were new (a replayed one is known already and changes nothing).

        Raises:
            ControlError: a line is malformed or not signed by anyone with the right to it (nothing
                is applied; the refusal is recorded).
            StateError: the actions could not be stored (nothing is applied).
        """
        runtime = self.runtime
        verifier = runtime.snapshot.grants.verifier
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise self.refused(
                ControlError(ControlCode.MALFORMED, "no action in the body"), "action", "/v1/control/actions"
            )
        try:
            actions = [verify_action(line, verifier=verifier, now=runtime.clock(), source="api") for line in lines]
        except ControlError as exc:
            raise self.refused(exc, "action", "/v1/control/actions") from None
        return runtime.add_actions(actions)

    def ladder(self) -> list[LadderEntry]:
        """Every target an action named, with its state (``frozen``, ``killed``, ``active``)."""
        return [LadderEntry(t, s.state, s.action) for t, s in sorted(self.runtime.ladder.states().items())]

    def approve(self, approval_id: str, token: str) -> Approval:
        """Approve ``approval_id`` with a signed approval (``agent-authz approve``).

        Raises:
            ControlError: the document does not verify, is expired, for another sidecar, for another
                approval, or signed by neither a root issuer nor an approver (recorded); the approval
                is unknown or not waiting (``control_unknown_approval``, ``control_approval_closed``).
            StateError: it could not be stored.
        """
        runtime = self.runtime
        path = f"/v1/approvals/{approval_id}"
        try:
            signer, named, ttl = verify_approval(
                token,
                verifier=runtime.snapshot.grants.verifier,
                approvers=frozenset(runtime.snapshot.loaded.settings.approvals.approvers),
                audience=runtime.snapshot.policy.agent,
                now=runtime.clock(),
            )
            if named != approval_id:
                raise ControlError(ControlCode.MALFORMED, f"the document approves {named!r}, not {approval_id!r}")
            return self._grant(approval_id, signer, ttl)
        except ControlError as exc:
            raise self.refused(exc, "approval", path) from None

    def approve_as(self, operator_token: str, approval_id: str, ttl: float | None) -> Approval:
        """Approve ``approval_id`` for the bearer of an operator token (the viewer's button).

        Raises:
            ControlError: as :meth:`approve`, for the token.
            StateError: it could not be stored.
        """
        runtime = self.runtime
        try:
            signer = verify_operator_token(
                operator_token,
                verifier=runtime.snapshot.grants.verifier,
                approvers=frozenset(runtime.snapshot.loaded.settings.approvals.approvers),
                audience=runtime.snapshot.policy.agent,
                now=runtime.clock(),
            )
            return self._grant(approval_id, signer, ttl)
        except ControlError as exc:
            raise self.refused(exc, "operator approval", f"/decisions/api/approvals/{approval_id}") from None

    def _grant(self, approval_id: str, signer: str, ttl: float | None) -> Approval:
        runtime = self.runtime
        book = runtime.approvals
        waiting = book.get(approval_id)
        if waiting is None:
            raise ControlError(ControlCode.UNKNOWN_APPROVAL, f"no call waits for approval {approval_id!r} here")
        task = runtime.snapshot.policy.tasks_by_id.get(waiting.call.task_id)
        if task is None:
            raise ControlError(ControlCode.APPROVAL_CLOSED, f"the task {waiting.call.task_id!r} is no longer held here")
        granted = book.approve(approval_id, by=signer, ttl=ttl, now=runtime.clock(), task_expires_at=task.expires_at)
        call = granted.call
        detail = f"{signer} approved {call.method} {call.host}:{call.port}{call.path}" + (
            f" (tool {call.tool})" if call.tool else ""
        )
        runtime.record(
            runtime.control_record(
                Reason.APPROVAL_GRANTED,
                task_id=call.task_id,
                approval=granted.record(),
                detail=detail,
                method=call.method,
                host=call.host,
                port=call.port,
                path=call.path,
                purpose=task.purpose,
            )
        )
        _log.info("approval_granted", approval_id=approval_id, by=signer, task_id=call.task_id)
        return granted

    def approvals(self) -> list[Approval]:
        """Every approval known, oldest first."""
        return list(self.runtime.approvals.all())
