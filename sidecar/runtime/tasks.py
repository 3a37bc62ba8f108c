"""The task API's service: accept grants, delegate with budget reservation, revoke, publish.

:mod:`sidecar.admin.tasks_api` is its HTTP face (``/v1/tasks…``, ``/v1/revocations``). Every change
goes through the :class:`~sidecar.runtime.active.Runtime` as a new
:class:`~sidecar.runtime.snapshot.CarriedState`: a posted grant is enforced by a rebuild that
includes it (or refused with the reason), a revocation joins this sidecar's own list and applies on
the rebuild it triggers. With a durable state, each is stored before it is answered (a posted grant,
a revocation, a delegation's reservation and child id), so none is forgotten by a restart.

Whoever reaches the task API speaks for the local agent (it is the agent's own API), so each call
is held to what a list or grant signed with the agent's SVID could do
(:func:`sidecar.grants.revocations.revoked_by`): the agent sees and delegates only its own tasks,
and revokes its own grants (giving them up), grants it delegated and grants below them. Anything
else - another agent's task, a task from the configuration (its operator revokes it) - is refused
with :class:`NotAuthorizedError` instead of answered with a revocation that changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from sidecar.config.schema import TaskSpec
from sidecar.control.ladder import describe
from sidecar.decision import Reason
from sidecar.errors import AgentAuthzError, ConfigError, ErrorCode, StateError
from sidecar.grants.issue import Delegation, DelegationRequest, plan_delegation, sign_delegation
from sidecar.grants.model import Grant, GrantCode, GrantError
from sidecar.grants.revocations import RevocationList, revoked_by, sign_revocations
from sidecar.grants.sources import check_grant_usable
from sidecar.policy.budget import BudgetKey
from sidecar.policy.model import Task
from sidecar.runtime.active import Runtime
from sidecar.runtime.snapshot import Snapshot
from sidecar.state.store import DelegatedChild

__all__ = ["NotAuthorizedError", "SubGrant", "TaskService"]

_log = structlog.get_logger("agent_authz.tasks")


class NotAuthorizedError(AgentAuthzError):
    """The local agent asked to revoke or delegate a task it has no authority over.

    Attributes:
        task_id: the task it named.
        action: ``revoke`` or ``delegate``.
    """

    code = ErrorCode.NOT_AUTHORIZED

    def __init__(self, task_id: str, action: str, message: str) -> None:
        self.task_id = task_id
        self.action = action
        super().__init__(message)


def _revocable(snapshot: Snapshot, task: Task) -> str | None:
    """Why the local agent may not revoke ``task`` (``None``: it may)."""
    agent = snapshot.policy.agent
    if task.agent != agent:
        return f"task {task.id!r} is not this agent's"
    if task.grant is None:
        return (
            f"task {task.id!r} comes from the configuration, not from a grant: its operator revokes it "
            "('revoked: true', or the pod annotation agent-authz.io/revoked)"
        )
    # its own grant: a list signed by the agent revokes it (giving up authority), as every sidecar holding it judges
    assert revoked_by(task.grant, [RevocationList(agent, frozenset({task.id}), 0, False, "")]) is not None
    return None


def _budget(task: Task, index: int | None) -> tuple[BudgetKey, int | None]:
    """The counter and limit of ``task``'s rule ``index`` (``None``: the task-wide budget)."""
    if index is None:
        return (task.id, ""), task.max_calls
    rule = task.rules[index]
    return (task.id, rule.budget_key), rule.max_calls


def _reservations(task: Task, delegation: Delegation) -> dict[BudgetKey, tuple[int, int | None]]:
    """What the child's budgets take from the parent's: counter -> ``(calls, parent limit)``."""
    child = delegation.child
    reservations: dict[BudgetKey, tuple[int, int | None]] = {}
    if child.max_calls is not None and task.max_calls is not None:
        reservations[_budget(task, None)[0]] = (child.max_calls, task.max_calls)
    for c_index, p_index in delegation.holders.items():
        budget_key, limit = _budget(task, p_index)
        amount = child.egress[c_index].max_calls
        if limit is not None and amount is not None:
            spent, _ = reservations.get(budget_key, (0, limit))
            reservations[budget_key] = (spent + amount, limit)
    return reservations


@dataclass(frozen=True, slots=True)
class SubGrant:
    """A sub-grant this sidecar issued (``POST /v1/tasks/{id}/delegate``).

    Attributes:
        spec: the child task (``id`` is ``<parent id>/<name>``, ``agent`` the sub-agent).
        parent: the delegating task's id.
        txn: the root grant's id.
        ancestors: ids from the root to the parent.
        issued_at: POSIX seconds.
    """

    spec: TaskSpec
    parent: str
    txn: str
    ancestors: tuple[str, ...]
    issued_at: float


class TaskService:
    """Accepts, delegates and revokes tasks on one :class:`Runtime`.

    A runtime that starts with revocations of its own (from the durable state) has its list signed
    and published again at once, so ``GET /v1/revocations`` and ``grants.publish_revocations`` hold
    every id revoked here before the restart.

    Args:
        runtime: the runtime whose snapshot enforces the tasks.
        forward: with a cluster authority, called as ``forward(task_id, list, grants)`` after each
            revocation: a list naming just that id, signed with the SVID, and the grants that show
            this agent's authority over it (the held grant, or the child this sidecar delegated).

    Attributes:
        runtime: as given.
    """

    def __init__(self, runtime: Runtime, *, forward: Callable[[str, str, list[str]], None] | None = None) -> None:
        self.runtime = runtime
        self._forward = forward
        self._published: str | None = None
        self._sub_grants: dict[str, SubGrant] = {}
        own = runtime.carried.own_revoked
        if own:
            try:
                self._publish(runtime.snapshot, dict(own))
            except OSError as exc:  # still served at GET /v1/revocations; the file is written on the next revoke
                _log.error("revocations_publish_failed", reason=str(exc))

    def accept(self, token: str) -> Grant:
        """Accept a grant posted by the local agent (``POST /v1/tasks``) and enforce it at once.

        Raises:
            GrantError: it does not verify, is expired, names another agent or a credential this
                sidecar lacks, reuses a task id (``grant_duplicate``), lies under a killed task or
                agent (``grant_rejected``), or the rebuild that would enforce it fails
                (``grant_rejected``, e.g. its TLS rules conflict with another task's).
            StateError: it could not be stored (it is not enforced).
        """
        runtime = self.runtime
        snapshot = runtime.snapshot
        now = runtime.clock()
        grant = snapshot.grants.verifier.verify(token.strip(), now=now)
        check_grant_usable(grant, snapshot.policy.agent, snapshot.loaded.settings.credentials)
        if now >= grant.expires_at:
            raise GrantError(GrantCode.EXPIRED, "the grant has expired")
        if grant.id in snapshot.policy.tasks_by_id:
            raise GrantError(GrantCode.DUPLICATE, f"task {grant.id!r} is already active")
        blocked = runtime.ladder.verdict(tuple((g.id, g.subject, g.signer) for g in grant.chain))
        if blocked is not None and blocked[0] is Reason.TASK_REVOKED:
            raise GrantError(GrantCode.REJECTED, f"the grant lies under a killed task: {describe(blocked[1])}")
        carried = runtime.carried
        try:
            runtime.apply(replace(carried, posted={**carried.posted, grant.id: grant.token}))
        except ConfigError as exc:
            _log.warning("grant_rejected", task_id=grant.id, reason=str(exc))
            raise GrantError(GrantCode.REJECTED, str(exc)) from None
        return grant

    def delegate(self, task_id: str, request: DelegationRequest) -> tuple[str, TaskSpec]:
        """Issue a sub-grant of ``task_id`` signed with this agent's SVID (``POST /v1/tasks/{id}/delegate``).

        The budget given to the child is reserved from the parent's (task-wide and per rule) before
        anything is signed; a refused delegation reserves nothing.

        Returns:
            ``(compact JWS, child TaskSpec)``.

        Raises:
            GrantError: unknown task (``grant_unknown_task``), not delegable (no identity to sign
                with, not a grant, revoked, frozen or killed, not valid now, too deep) or a widening
                (``grant_widening``, naming the field; also when the parent's budget left is smaller).
            NotAuthorizedError: the task is another agent's.
        """
        runtime = self.runtime
        snapshot = runtime.snapshot
        task = snapshot.policy.tasks_by_id.get(task_id)
        if task is None:
            raise GrantError(GrantCode.UNKNOWN_TASK, f"no task {task_id!r} for this agent")
        if task.agent != snapshot.policy.agent:
            raise NotAuthorizedError(task_id, "delegate", f"task {task_id!r} is not this agent's to delegate")
        if snapshot.identity is None:
            raise GrantError(
                GrantCode.NOT_DELEGABLE, "delegation signs with the agent's X.509-SVID: configure an identity source"
            )
        if task.grant is None:
            raise GrantError(GrantCode.NOT_DELEGABLE, "only tasks that came from a signed grant can be delegated")
        blocked = runtime.blocks.get(task.id)
        if blocked is not None:
            raise GrantError(GrantCode.NOT_DELEGABLE, f"the task is blocked: {blocked[1]}")
        svid, budgets = snapshot.identity.state.svid, runtime.budgets

        def remaining(index: int | None) -> int | None:
            budget_key, limit = _budget(task, index)
            return None if limit is None else limit - budgets.used(budget_key)

        delegation = plan_delegation(
            task.grant,
            request,
            issuer=svid.spiffe_id,
            revoked=task.revoked,
            window=(task.not_before, task.expires_at),
            now=runtime.clock(),
            max_depth=snapshot.loaded.settings.grants.max_depth,
            remaining=remaining,
        )
        reservations = _reservations(task, delegation)
        if not budgets.try_reserve(reservations):
            raise GrantError(
                GrantCode.WIDENING, "max_calls: the parent's budget left is smaller than the delegated budgets"
            )
        token = sign_delegation(delegation, svid)
        child = delegation.child
        assert child.expires_at is not None  # a delegated child always has its end
        record = DelegatedChild(
            task_id,
            child.expires_at.timestamp(),
            tuple((k, n) for k, (n, _) in sorted(reservations.items())),
            token,
        )
        carried = runtime.carried
        runtime.remember(replace(carried, issued={**carried.issued, child.id: record}))
        grant = task.grant
        self._sub_grants[child.id] = SubGrant(child, task.id, grant.txn, (*grant.ancestors, grant.id), runtime.clock())
        _log.info(
            "task_delegated", task_id=task_id, child=child.id, subject=child.agent, expires_at=str(child.expires_at)
        )
        return token, child

    def visible(self) -> list[Task]:
        """The tasks the task API shows: the local agent's own (``GET /v1/tasks``), in id order."""
        policy = self.runtime.snapshot.policy
        return sorted((t for t in policy.tasks_by_id.values() if t.agent == policy.agent), key=lambda t: t.id)

    def revoke(self, task_id: str) -> str | None:
        """Revoke a task this agent holds or delegated (``POST /v1/tasks/{id}/revoke``).

        The id joins this sidecar's own revocation list, which applies here at once (and, should the
        rebuild fail, on the next successful reload) and is signed with the agent's SVID and written
        to ``grants.publish_revocations`` for other sidecars to watch.

        Returns:
            The compact JWS of the published list, or ``None`` without an identity to sign it.

        Raises:
            GrantError: ``grant_unknown_task`` for an id this sidecar has never seen.
            NotAuthorizedError: a task the agent's signature has no authority over (another agent's,
                or one from the configuration); nothing is revoked, stored or published.
            StateError: the revocation could not be stored; it applies and is published all the
                same, but a restart would forget it.
        """
        runtime = self.runtime
        snapshot = runtime.snapshot
        carried = runtime.carried
        task = snapshot.policy.tasks_by_id.get(task_id)
        if task is None and task_id not in carried.issued:
            raise GrantError(GrantCode.UNKNOWN_TASK, f"no task {task_id!r} held or delegated here")
        if task_id not in carried.issued:
            assert task is not None
            problem = _revocable(snapshot, task)
            if problem is not None:
                raise NotAuthorizedError(task_id, "revoke", problem)
        carried = replace(carried, own_revoked={**carried.own_revoked, task_id: int(runtime.clock())})
        unstored: StateError | None = None
        try:
            runtime.remember(carried)
        except StateError as exc:  # it still applies here and is published: a revocation must not wait
            unstored = exc
        token = self._publish(snapshot, dict(carried.own_revoked))
        runtime.reload()
        _log.info("task_revoked", task_id=task_id, published=token is not None, stored=unstored is None)
        self._forward_revocation(snapshot, task_id, carried.own_revoked[task_id])
        if unstored is not None:
            reason = f"revoked here and published, but not stored (a restart would forget it): {unstored.reason}"
            raise StateError(unstored.file, reason)
        return token

    def _forward_revocation(self, snapshot: Snapshot, task_id: str, revoked_at: int) -> None:
        """Hand the revocation to the authority: a one-id list and the grant showing the authority."""
        identity = snapshot.identity
        if self._forward is None or identity is None:
            return
        grants: list[str] = []
        held = snapshot.policy.tasks_by_id.get(task_id)
        if held is not None and held.grant is not None:
            grants.append(held.grant.token)
        issued = self.runtime.carried.issued.get(task_id)
        if issued is not None and issued.token:  # kept in the durable state: also after a restart
            grants.append(issued.token)
        svid = identity.state.svid
        single = sign_revocations(
            [task_id], svid.private_key, issuer=svid.spiffe_id, issued_at=revoked_at, x5c=list(svid.chain)
        )
        self._forward(task_id, single, grants)

    def delegations(self) -> tuple[SubGrant, ...]:
        """The sub-grants this service issued, oldest first (kept for the life of the process)."""
        return tuple(self._sub_grants.values())

    def revoked_here(self) -> frozenset[str]:
        """Task ids this sidecar revoked itself (its own revocation list)."""
        return frozenset(self.runtime.carried.own_revoked)

    def revocation_list(self) -> str | None:
        """This sidecar's own signed revocation list (``GET /v1/revocations``), or ``None``."""
        return self._published

    def _publish(self, snapshot: Snapshot, revoked: dict[str, int]) -> str | None:
        identity = snapshot.identity
        if identity is None:
            return None
        svid = identity.state.svid
        token = sign_revocations(
            revoked, svid.private_key, issuer=svid.spiffe_id, issued_at=max(revoked.values()), x5c=list(svid.chain)
        )
        self._published = token
        target = snapshot.loaded.settings.grants.publish_revocations
        if target is not None:
            path = snapshot.loaded.resolve(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(token + "\n")
            tmp.replace(path)  # atomic: watchers never read half a list
        return token
