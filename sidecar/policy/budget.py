"""Call budgets: exact counters per task and per rule.

The ledger lives outside the compiled policy so that counts survive a configuration reload, and it
can be backed by a :class:`CounterJournal` (the durable state store) so that they survive a restart.
``try_consume`` checks and increments all counters of one call without yielding to the event
loop, so concurrent requests can never overspend a budget; with a journal, the new values of the
limited counters are written to it first, and a journal that fails leaves the ledger unchanged
(the call is not allowed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from sidecar.policy.model import EgressRule, Task

if TYPE_CHECKING:
    from sidecar.agentproto.rules import ToolRule

__all__ = ["BudgetKey", "BudgetLedger", "CounterJournal", "budget_limits"]

BudgetKey = tuple[str, str]
"""``(task_id, counter)``: the task-wide counter is ``(task_id, "")``, a rule's ``(task_id,
rule.budget_key)``. The first element is always the task id; the ledger and its journal treat the
rest as opaque (new kinds of counters are new keys, nothing else)."""


def budget_limits(
    task: Task, rule: EgressRule, tool: ToolRule | None = None
) -> tuple[tuple[BudgetKey, int | None], ...]:
    """The counters one call under ``rule`` spends, with their limits: the task's and the rule's,
    and for an MCP ``tools/call`` allowed by a ``tools`` entry also the entry's (``max_calls``)."""
    limits = (((task.id, ""), task.max_calls), ((task.id, rule.budget_key), rule.max_calls))
    return limits if tool is None else (*limits, ((task.id, tool.budget_key), tool.max_calls))


class CounterJournal(Protocol):
    """Where the ledger makes its limited counters durable (:class:`sidecar.state.StateStore`)."""

    def save_counters(self, counters: Mapping[BudgetKey, int]) -> None:
        """Durably store these counter values before the ledger applies them.

        Raises:
            StateError: the write failed (the ledger then changes nothing).
        """
        ...


class BudgetLedger:
    """Counts calls spent against ``max_calls`` limits.

    Args:
        used: counters to start from (e.g. loaded from the durable state).
        journal: where counters with a limit are written before each change; counters without a
            limit (``None``) limit nothing and stay in memory.
    """

    __slots__ = ("_journal", "_used")

    def __init__(self, used: Mapping[BudgetKey, int] | None = None, journal: CounterJournal | None = None) -> None:
        self._used: dict[BudgetKey, int] = dict(used or {})
        self._journal = journal

    def used(self, key: BudgetKey) -> int:
        """Calls spent (or reserved for delegated tasks) so far under ``key``."""
        return self._used.get(key, 0)

    def available(self, limits: Sequence[tuple[BudgetKey, int | None]]) -> bool:
        """Whether one more call fits under every ``(key, limit)``; ``None`` limits are unlimited."""
        used = self._used
        return all(limit is None or used.get(key, 0) < limit for key, limit in limits)

    def try_consume(self, limits: Sequence[tuple[BudgetKey, int | None]]) -> bool:
        """Spend one call under every key if all have room; otherwise spend nothing.

        Returns:
            ``True`` when the call was counted (durably first, with a journal).

        Raises:
            StateError: the journal could not write the new counts (nothing was spent).
        """
        if not self.available(limits):
            return False
        used = self._used
        journal = self._journal
        if journal is not None:
            limited = {key: used.get(key, 0) + 1 for key, limit in limits if limit is not None}
            if limited:
                journal.save_counters(limited)
        for key, _ in limits:
            used[key] = used.get(key, 0) + 1
        return True

    def refund(self, limits: Sequence[tuple[BudgetKey, int | None]]) -> None:
        """Give back one call under every key (a call counted by :meth:`try_consume` that was then
        denied before it left, e.g. ``headers_too_large``); durably first, with a journal.

        Raises:
            StateError: the journal could not write the new counts (the call stays spent: failing
                closed, a budget is never given back in memory only).
        """
        used = self._used
        lowered = {key: used.get(key, 0) - 1 for key, _ in limits if used.get(key, 0) > 0}
        journal = self._journal
        if journal is not None:
            limited = {key: value for key, value in lowered.items() if dict(limits).get(key) is not None}
            if limited:
                journal.save_counters(limited)
        used.update(lowered)

    def try_reserve(self, amounts: Mapping[BudgetKey, tuple[int, int | None]]) -> bool:
        """Spend ``amount`` calls under each key at once if every ``(amount, limit)`` fits; else nothing.

        Used when a task delegates budget to a sub-agent: the delegated calls are reserved up front.

        Raises:
            StateError: the journal could not write the new counts (nothing was reserved).
        """
        used = self._used
        if not all(limit is None or used.get(key, 0) + amount <= limit for key, (amount, limit) in amounts.items()):
            return False
        journal = self._journal
        if journal is not None:
            limited = {key: used.get(key, 0) + amount for key, (amount, limit) in amounts.items() if limit is not None}
            if limited:
                journal.save_counters(limited)
        for key, (amount, _) in amounts.items():
            used[key] = used.get(key, 0) + amount
        return True

    def retain(self, task_ids: Iterable[str]) -> None:
        """Drop counters of tasks no longer known (in memory; the store drops its own with the task)."""
        keep = set(task_ids)
        for key in [k for k in self._used if k[0] not in keep]:
            del self._used[key]

    def snapshot(self) -> dict[BudgetKey, int]:
        """A copy of all counters."""
        return dict(self._used)
