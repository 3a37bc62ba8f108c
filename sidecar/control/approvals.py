"""Human approvals: calls waiting for one, approvals granted, and their single use.

An egress rule with ``approval`` hands each call it covers to :meth:`ApprovalBook.check` as a
:class:`~sidecar.policy.gates.CallBinding`. The first time, the call is put up for approval: a new
approval in state ``pending`` (its id goes back to the agent in the 403 ``approval_required`` body
and into the record). An operator approves it (:meth:`ApprovalBook.approve`, from ``agent-authz
approve ID`` or the viewer's button): ``approved`` until ``expires_at``. The agent's retry of exactly
that call finds it and - after its budget is charged - :meth:`ApprovalBook.consume` marks it
``consumed`` in the durable state before the allow is answered. Then:

* the same call again: ``approval_replayed`` (an approval allows one call);
* a call of the same shape with other arguments, body or query while an approval is open:
  ``approval_mismatch``;
* the retry after ``expires_at``: ``approval_expired``;
* the retry after the task's declaration changed (its fingerprint, the policy version bound at
  creation): ``approval_policy_changed``.

Each of these denials puts the new call up for approval (its id in the answer), so a legitimate
second call can be approved on its own. A pending approval is forgotten after
``approvals.pending_ttl``; at most ``approvals.max_pending`` wait per task (the oldest goes). Every
change is written to the durable state first, so approvals survive a restart.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from sidecar.config.schema import ApprovalsSpec
from sidecar.control.documents import ControlCode, ControlError
from sidecar.decision import Reason
from sidecar.policy.gates import CallBinding, GateVerdict

__all__ = ["Approval", "ApprovalBook", "ApprovalJournal", "ApprovalState"]

_HISTORY = 10_000
"""Closed approvals kept (to tell a replay from a new call); the oldest go first."""


class ApprovalState(enum.StrEnum):
    """Where an approval stands."""

    PENDING = "pending"
    """The call waits for a human."""
    APPROVED = "approved"
    """Approved: the retry of exactly this call is allowed once, until ``expires_at``."""
    CONSUMED = "consumed"
    """Used by the allowed retry."""
    EXPIRED = "expired"
    """Not used (approved) or not approved (pending) in time."""
    STALE = "stale"
    """The task's declaration changed: no longer valid."""


_OPEN = (ApprovalState.PENDING, ApprovalState.APPROVED)


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval.

    Attributes:
        id: what the agent, the records and ``agent-authz approve`` name it by.
        call: the call it binds.
        state: see :class:`ApprovalState`.
        created_at: when the call was first denied (POSIX seconds).
        expires_at: pending: when it is forgotten; approved: until when it may be used.
        approved_at / approved_by: when and by whom (``key:<kid>`` or a SPIFFE ID).
        used_at / used_by: when it was consumed, and the decision id of the allowed call.
    """

    id: str
    call: CallBinding
    state: ApprovalState
    created_at: float
    expires_at: float
    approved_at: float | None = None
    approved_by: str | None = None
    used_at: float | None = None
    used_by: str | None = None

    def record(self) -> dict[str, object]:
        """What decision records and the API say about it."""
        out: dict[str, object] = {"id": self.id, "status": self.state.value, "expires_at": round(self.expires_at, 3)}
        if self.approved_by is not None:
            out["approved_by"] = self.approved_by
            out["approved_at"] = self.approved_at
        if self.used_by is not None:
            out["used_by"] = self.used_by
        return out

    def listing(self) -> dict[str, object]:
        """The API's view: :meth:`record` and the bound call."""
        return {
            **self.record(),
            "created_at": self.created_at,
            "task_id": self.call.task_id,
            "call": self.call.as_record(),
        }


class ApprovalJournal(Protocol):
    """Where approvals are kept (:class:`sidecar.state.StateStore`)."""

    def save_approvals(self, approvals: Sequence[Approval], dropped: Sequence[str] = ()) -> None:
        """Store these approvals (inserted or replaced) and delete ``dropped`` ids, in one transaction.

        Raises:
            StateError: the write failed (the book then changes nothing).
        """
        ...


class ApprovalBook:
    """The approvals of one sidecar (implements :class:`~sidecar.policy.gates.ApprovalGate`).

    Args:
        settings: the ``approvals`` section (TTLs, ``max_pending``).
        approvals: to start from (the durable state's).
        journal: where every change is written before it takes effect.
    """

    def __init__(
        self,
        settings: ApprovalsSpec,
        approvals: Iterable[Approval] = (),
        journal: ApprovalJournal | None = None,
    ) -> None:
        self.settings = settings
        self._journal = journal
        self._by_id: dict[str, Approval] = {}  # in creation order
        self._by_digest: dict[str, list[str]] = {}
        self._by_shape: dict[str, list[str]] = {}
        for approval in sorted(approvals, key=lambda a: a.created_at):
            self._put(approval)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _put(self, approval: Approval) -> None:
        if approval.id not in self._by_id:
            self._by_digest.setdefault(approval.call.digest, []).append(approval.id)
            self._by_shape.setdefault(approval.call.shape_digest, []).append(approval.id)
        self._by_id[approval.id] = approval

    def _drop(self, approval_id: str) -> None:
        approval = self._by_id.pop(approval_id, None)
        if approval is None:
            return
        for index, key in ((self._by_digest, approval.call.digest), (self._by_shape, approval.call.shape_digest)):
            ids = index.get(key, [])
            if approval_id in ids:
                ids.remove(approval_id)
            if not ids:
                index.pop(key, None)

    def _commit(self, changed: Sequence[Approval], dropped: Sequence[str] = ()) -> None:
        """Store, then apply (a failed write changes nothing)."""
        if self._journal is not None and (changed or dropped):
            self._journal.save_approvals(changed, dropped)
        for approval_id in dropped:
            self._drop(approval_id)
        for approval in changed:
            self._put(approval)

    def get(self, approval_id: str) -> Approval | None:
        """The approval with this id, if known."""
        return self._by_id.get(approval_id)

    def all(self) -> tuple[Approval, ...]:
        """Every approval known, oldest first."""
        return tuple(self._by_id.values())

    def pending(self) -> tuple[Approval, ...]:
        """The calls waiting for a human, oldest first."""
        return tuple(a for a in self.all() if a.state is ApprovalState.PENDING)

    # -- the request path -------------------------------------------------------------------------
    def check(self, call: CallBinding, *, now: float, task_expires_at: float) -> GateVerdict:
        """See :meth:`sidecar.policy.gates.ApprovalGate.check`."""
        changed: list[Approval] = []
        reason = Reason.APPROVAL_REQUIRED
        same = [self._by_id[i] for i in self._by_digest.get(call.digest, ())]
        for approval in same:
            if approval.state not in _OPEN:
                continue
            if approval.state is ApprovalState.APPROVED:
                if approval.call.policy_version != call.policy_version:
                    changed.append(replace(approval, state=ApprovalState.STALE))
                    reason = Reason.APPROVAL_POLICY_CHANGED
                elif now >= approval.expires_at:
                    changed.append(replace(approval, state=ApprovalState.EXPIRED))
                    reason = Reason.APPROVAL_EXPIRED
                else:
                    return GateVerdict(Reason.ALLOWED, approval.id, approval.record())
            elif now >= approval.expires_at or approval.call.policy_version != call.policy_version:
                changed.append(replace(approval, state=ApprovalState.EXPIRED))  # never approved: replaced
            else:
                return GateVerdict(Reason.APPROVAL_REQUIRED, approval.id, approval.record())
        if reason is Reason.APPROVAL_REQUIRED:
            if any(a.state is ApprovalState.CONSUMED for a in same):
                reason = Reason.APPROVAL_REPLAYED
            elif self._open_of_shape(call, now):
                reason = Reason.APPROVAL_MISMATCH
        waiting = Approval(
            secrets.token_hex(8),
            call,
            ApprovalState.PENDING,
            now,
            min(now + self.settings.pending_ttl, task_expires_at),
        )
        dropped = self._overflow(call.task_id, now)
        self._commit([*changed, waiting], dropped)
        return GateVerdict(reason, waiting.id, waiting.record())

    def _open_of_shape(self, call: CallBinding, now: float) -> bool:
        found = (self._by_id[i] for i in self._by_shape.get(call.shape_digest, ()))
        return any(a.state is ApprovalState.APPROVED and now < a.expires_at for a in found)

    def _overflow(self, task_id: str, now: float) -> list[str]:
        """Ids to drop before adding a pending approval: forgotten pending ones, the oldest pending
        one of the task when it has ``max_pending``, and the oldest closed ones over the history."""
        pending = [a for a in self._by_id.values() if a.state is ApprovalState.PENDING]
        dropped = [a.id for a in pending if now >= a.expires_at]
        waiting = [a for a in pending if a.call.task_id == task_id and now < a.expires_at]
        if len(waiting) >= self.settings.max_pending:
            dropped += [a.id for a in waiting[: len(waiting) - self.settings.max_pending + 1]]
        if len(self._by_id) - len(pending) >= _HISTORY:
            closed = [a for a in self._by_id.values() if a.state not in _OPEN]
            dropped += [a.id for a in closed[: len(closed) - _HISTORY + 1]]
        return dropped

    def consume(self, approval_id: str, *, now: float, decision_id: str) -> Mapping[str, object]:
        """See :meth:`sidecar.policy.gates.ApprovalGate.consume`."""
        approval = self._by_id[approval_id]
        used = replace(approval, state=ApprovalState.CONSUMED, used_at=now, used_by=decision_id)
        self._commit([used])
        return used.record()

    # -- the operator ---------------------------------------------------------------------------------
    def approve(self, approval_id: str, *, by: str, ttl: float | None, now: float, task_expires_at: float) -> Approval:
        """Approve the waiting call ``approval_id`` for one retry within ``ttl`` seconds (default
        ``approvals.default_ttl``, at most ``max_ttl``, never past the task's end).

        Raises:
            ControlError: ``control_unknown_approval`` (no such id, or forgotten),
                ``control_approval_closed`` (not waiting: already approved, used, expired, stale).
            StateError: the approval could not be stored (nothing changed).
        """
        approval = self._by_id.get(approval_id)
        if approval is None or (approval.state is ApprovalState.PENDING and now >= approval.expires_at):
            raise ControlError(ControlCode.UNKNOWN_APPROVAL, f"no call waits for approval {approval_id!r} here")
        if approval.state is not ApprovalState.PENDING:
            raise ControlError(ControlCode.APPROVAL_CLOSED, f"approval {approval_id!r} is {approval.state.value}")
        lasts = min(self.settings.default_ttl if ttl is None else ttl, self.settings.max_ttl)
        granted = replace(
            approval,
            state=ApprovalState.APPROVED,
            approved_at=now,
            approved_by=by,
            expires_at=min(now + lasts, task_expires_at),
        )
        self._commit([granted])
        return granted
