"""The freeze ladder: which tasks are frozen or killed, from the actions this sidecar honours.

Actions (:class:`~sidecar.control.documents.Action`) come from this sidecar's own quarantines,
from ``POST /v1/control/actions``, from the ``ladder.files`` it watches (another sidecar's
``ladder.publish``, an operator's file). They are kept by id in the durable state and never
forgotten: the ladder's state is a fold over them, in the order of their ``at``.

For one task, an action applies when its target names the task (``task:``), the task or a task it
was delegated from (``subtree:``), or the agent of one of those (``agent:``). It is honoured when
its signer has authority (:func:`sidecar.grants.revocations.may_act_on`: a root issuer; the agent
itself; whoever delegated the task, directly or not) - an own quarantine always is, an ``unfreeze``
only from a root issuer, and an action on ``agent:X`` from a non-root signer only when it is X.
Per target: a ``kill`` is final (the tasks are revoked, ``task_revoked``, and a new grant below it is
refused); a ``freeze`` holds until a later ``unfreeze`` of the same target. A task is frozen
(``task_quarantined``) while any target that applies to it is.

:meth:`Ladder.blocks` computes, per compiled policy, the task id -> block map the decision reads
(one dict lookup per call); the runtime recomputes it when the policy or the actions change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from sidecar.control.documents import Action, ActionKind, TargetKind
from sidecar.decision import Reason
from sidecar.errors import StateError
from sidecar.grants.revocations import may_act_on
from sidecar.policy.model import PolicyIndex

__all__ = ["Ladder", "LadderJournal", "TargetState", "describe"]

_log = structlog.get_logger("agent_authz.ladder")

Lineage = Sequence[tuple[str, str, str]]
"""``(task id, agent, signer of its grant)``, the task first (:attr:`sidecar.policy.model.Task.lineage`)."""


class LadderJournal(Protocol):
    """Where the ladder keeps its actions (:class:`sidecar.state.StateStore`)."""

    def save_actions(self, actions: Sequence[Action]) -> None:
        """Durably store these actions (new ones; an id already stored is left as it is).

        Raises:
            StateError: the write failed (the ladder then changes nothing).
        """
        ...


@dataclass(frozen=True, slots=True)
class TargetState:
    """Where one target stands.

    Attributes:
        state: ``frozen``, ``killed`` or ``active`` (unfrozen).
        action: the action that put it there.
    """

    state: str
    action: Action


def _order(action: Action) -> tuple[float, str]:
    return action.at, action.action_id


def _positions(action: Action, lineage: Lineage) -> list[int]:
    """Where in ``lineage`` the action's target applies."""
    target = action.target
    if target.kind is TargetKind.TASK:
        return [0] if lineage and lineage[0][0] == target.id else []
    if target.kind is TargetKind.SUBTREE:
        return [i for i, (task_id, _, _) in enumerate(lineage) if task_id == target.id]
    return [i for i, (_, agent, _) in enumerate(lineage) if agent == target.id]


def _honoured(action: Action, lineage: Lineage, positions: list[int]) -> bool:
    if action.source == "own" or action.root:
        return True
    if action.kind is ActionKind.UNFREEZE:
        return False
    if action.target.kind is TargetKind.AGENT:
        return action.signer == action.target.id
    links = [(agent, signer) for _, agent, signer in lineage]
    return any(may_act_on(action.signer, False, links[i:]) for i in positions)


class Ladder:
    """The actions this sidecar honours, and the freezes and kills they add up to.

    Args:
        actions: the actions to start from (the durable state's).
        journal: where new actions are stored before they take effect.
    """

    def __init__(self, actions: Iterable[Action] = (), journal: LadderJournal | None = None) -> None:
        self._journal = journal
        self._actions: dict[str, Action] = {}
        self._by_id: dict[str, list[Action]] = {}
        self._tokens: set[str] = set()
        for action in sorted(actions, key=_order):
            self._index(action)

    def _index(self, action: Action) -> None:
        self._actions[action.action_id] = action
        if action.token:
            self._tokens.add(action.token)
        self._by_id.setdefault(action.target.id, []).append(action)
        self._by_id[action.target.id].sort(key=_order)

    def __len__(self) -> int:
        return len(self._actions)

    def __contains__(self, action_id: object) -> bool:
        return action_id in self._actions

    def knows_token(self, token: str) -> bool:
        """Whether this exact signed action is honoured already (no need to verify it again)."""
        return token.strip() in self._tokens

    def actions(self) -> tuple[Action, ...]:
        """Every action, in order."""
        return tuple(sorted(self._actions.values(), key=_order))

    def own(self) -> tuple[Action, ...]:
        """This sidecar's own actions (its quarantines), in order: what it publishes."""
        return tuple(a for a in self.actions() if a.source == "own")

    def add(self, actions: Iterable[Action], *, strict: bool = True) -> list[Action]:
        """Honour ``actions`` from now on (stored first); ids already known are skipped.

        Args:
            actions: the actions.
            strict: a journal that cannot store them refuses them; otherwise (they only ever
                restrict: a reload, a quarantine) the failure is logged and they apply in memory.

        Returns:
            The actions that were new.

        Raises:
            StateError: with ``strict``, the journal could not store them (nothing changed).
        """
        new: dict[str, Action] = {}
        for action in actions:
            if action.action_id not in self._actions and action.action_id not in new:
                new[action.action_id] = action
        if new and self._journal is not None:
            try:
                self._journal.save_actions(list(new.values()))
            except StateError as exc:
                if strict:
                    raise
                _log.error("state_write_failed", file=exc.file, reason=exc.reason, code=exc.code, actions=len(new))
        for action in new.values():
            self._index(action)
        return list(new.values())

    def verdict(self, lineage: Lineage) -> tuple[Reason, Action] | None:
        """Whether a task with this lineage is killed (``task_revoked``) or frozen
        (``task_quarantined``), and by which action; ``None`` when neither."""
        if not self._actions:
            return None
        ids = {task_id for task_id, _, _ in lineage} | {agent for _, agent, _ in lineage}
        relevant = sorted((a for key in ids for a in self._by_id.get(key, ())), key=_order)
        states: dict[tuple[str, str], TargetState] = {}
        killed: Action | None = None
        for action in relevant:
            positions = _positions(action, lineage)
            if not positions or not _honoured(action, lineage, positions):
                continue
            key = (action.target.kind.value, action.target.id)
            if action.kind is ActionKind.KILL:
                states[key] = TargetState("killed", action)
                killed = killed or action
            elif key in states and states[key].state == "killed":
                continue
            elif action.kind is ActionKind.FREEZE:
                states[key] = TargetState("frozen", action)
            else:
                states[key] = TargetState("active", action)
        if killed is not None:
            return Reason.TASK_REVOKED, killed
        frozen = [s.action for s in states.values() if s.state == "frozen"]
        if frozen:
            return Reason.TASK_QUARANTINED, max(frozen, key=_order)
        return None

    def blocks(self, policy: PolicyIndex) -> dict[str, tuple[Reason, str]]:
        """Task id -> ``(reason, detail)`` for every compiled task the ladder blocks."""
        if not self._actions:
            return {}
        out: dict[str, tuple[Reason, str]] = {}
        for task in policy.tasks_by_id.values():
            found = self.verdict(task.lineage)
            if found is not None:
                reason, action = found
                out[task.id] = (reason, describe(action))
        return out

    def states(self) -> dict[str, TargetState]:
        """Target (``kind:id``) -> its state, for the viewer and ``GET /v1/control/actions`` (authority
        is judged per task; here every action counts as its signer meant it)."""
        out: dict[str, TargetState] = {}
        for action in self.actions():
            key = str(action.target)
            current = out.get(key)
            if current is not None and current.state == "killed":
                continue
            if action.kind is ActionKind.UNFREEZE and not action.root:
                continue
            state = {"kill": "killed", "freeze": "frozen"}.get(action.kind.value, "active")
            out[key] = TargetState(state, action)
        return out

    def frozen_targets(self) -> Mapping[str, TargetState]:
        """The targets frozen now (see :meth:`states`)."""
        return {k: v for k, v in self.states().items() if v.state == "frozen"}


def describe(action: Action) -> str:
    """A deny's detail for a freeze or kill: what, by whom, why."""
    verb = {"kill": "killed", "freeze": "frozen"}.get(action.kind.value, action.kind.value)
    by = "the anomaly rule (quarantine)" if action.source == "own" and action.evidence else action.signer
    why = f": {action.reason}" if action.reason else ""
    return f"{action.target} {verb} by {by} (action {action.action_id}){why}"
