"""The anomaly rule: count a task's out-of-task denials in a sliding window; trip at the threshold.

A hijacked agent shows itself by trying things outside its task. Each denial whose reason is in
``quarantine.reasons`` (by default the out-of-task kinds: host, port, method, path, the MCP tool,
argument, resource, prompt and JSON-RPC method denials, a sensitivity above the task's maximum) is a
*strike* against the task the call was judged against, kept with its decision id. When a task has
``threshold`` strikes within the last ``window`` seconds, the rule trips: the runtime freezes the
task's delegation subtree (or, in dry run, records ``would_quarantine``) with those decision ids as
the evidence, and the strikes start over.

Budget-exhausted, expired, revoked and already-frozen calls never count (the schema refuses such
reasons), and neither do denials not judged against a task of this agent (an unknown task, another
agent's task named in ``x-agent-task``: counting those would let one agent freeze another's).

Strikes are kept in the durable state, so a restart does not wipe a probing agent's record.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.config.schema import QuarantineSpec
from sidecar.decision import Reason
from sidecar.policy.model import QuarantineRule, Task

__all__ = ["AnomalyDetector", "Strike", "StrikeJournal", "effective_rule"]


@dataclass(frozen=True, slots=True)
class Strike:
    """One counted denial: its decision id, when (POSIX seconds) and why."""

    decision_id: str
    at: float
    reason: str


class StrikeJournal(Protocol):
    """Where strikes are kept (:class:`sidecar.state.StateStore`)."""

    def save_strikes(self, task_id: str, strikes: Sequence[Strike]) -> None:
        """Replace the stored strikes of ``task_id`` with ``strikes`` (one transaction).

        Raises:
            StateError: the write failed.
        """
        ...


def effective_rule(spec: QuarantineSpec, task: Task) -> QuarantineRule | None:
    """The rule that applies to ``task``: the stricter of the sidecar's (``quarantine``, when its
    threshold is not 0) and the task's own - the lower threshold, the longer window; ``None`` when
    neither exists."""
    rules = [task.quarantine] if task.quarantine is not None else []
    if spec.threshold > 0:
        rules.append(QuarantineRule(spec.threshold, spec.window))
    if not rules:
        return None
    return QuarantineRule(min(r.threshold for r in rules), max(r.window for r in rules))


class AnomalyDetector:
    """Strikes per task.

    Args:
        strikes: task id -> strikes to start from (the durable state's).
        journal: where they are written after each change.
    """

    def __init__(
        self, strikes: Mapping[str, Iterable[Strike]] | None = None, journal: StrikeJournal | None = None
    ) -> None:
        self._journal = journal
        self._strikes: dict[str, deque[Strike]] = {
            k: deque(sorted(v, key=lambda s: s.at)) for k, v in (strikes or {}).items()
        }

    def strikes(self, task_id: str) -> tuple[Strike, ...]:
        """The strikes kept for ``task_id``, oldest first."""
        return tuple(self._strikes.get(task_id, ()))

    def count(
        self, task_id: str, rule: QuarantineRule, *, decision_id: str, reason: Reason, now: float
    ) -> tuple[Strike, ...] | None:
        """Count one denial against ``task_id``.

        Returns:
            The evidence (the strikes within the window, oldest first) when this one trips the rule -
            the task's strikes then start over - else ``None``.

        Raises:
            StateError: the strikes could not be stored (in memory they are counted all the same).
        """
        kept = self._strikes.setdefault(task_id, deque())
        kept.append(Strike(decision_id, now, reason.value))
        while kept and kept[0].at <= now - rule.window:
            kept.popleft()
        while len(kept) > rule.threshold:
            kept.popleft()
        tripped = tuple(kept) if len(kept) >= rule.threshold else None
        if tripped is not None:
            kept.clear()
        self._save(task_id)
        return tripped

    def clear(self, task_ids: Iterable[str]) -> None:
        """Forget the strikes of these tasks (an operator unfroze them: they start with a clean slate).

        Raises:
            StateError: the store could not be written.
        """
        for task_id in task_ids:
            if self._strikes.pop(task_id, None):
                self._save(task_id)

    def retain(self, task_ids: Iterable[str]) -> None:
        """Drop strikes of tasks no longer known (in memory; the store drops them with the task)."""
        keep = set(task_ids)
        for task_id in [t for t in self._strikes if t not in keep]:
            del self._strikes[task_id]

    def _save(self, task_id: str) -> None:
        if self._journal is not None:
            self._journal.save_strikes(task_id, tuple(self._strikes.get(task_id, ())))
