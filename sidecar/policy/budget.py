"""Call budgets: exact counters per task and per rule.

The ledger lives outside the compiled policy so that counts survive a configuration reload.
``try_consume`` checks and increments all counters of one call without yielding to the event
loop, so concurrent requests can never overspend a budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from sidecar.policy.model import EgressRule, Task

if TYPE_CHECKING:
    from sidecar.agentproto.rules import ToolRule

__all__ = ["BudgetKey", "BudgetLedger", "budget_limits"]

BudgetKey = tuple[str, str]
"""``(task_id, rule_budget_key)``; the task-wide counter uses ``(task_id, "")``."""


def budget_limits(
    task: Task, rule: EgressRule, tool: ToolRule | None = None
) -> tuple[tuple[BudgetKey, int | None], ...]:
    """The counters one call under ``rule`` spends, with their limits: the task's and the rule's,
    and for an MCP ``tools/call`` allowed by a ``tools`` entry also the entry's (``max_calls``)."""
    limits = (((task.id, ""), task.max_calls), ((task.id, rule.budget_key), rule.max_calls))
    return limits if tool is None else (*limits, ((task.id, tool.budget_key), tool.max_calls))


class BudgetLedger:
    """Counts calls spent against ``max_calls`` limits."""

    __slots__ = ("_used",)

    def __init__(self) -> None:
        self._used: dict[BudgetKey, int] = {}

    def used(self, key: BudgetKey) -> int:
        """Calls spent so far under ``key``."""
        return self._used.get(key, 0)

    def available(self, limits: Sequence[tuple[BudgetKey, int | None]]) -> bool:
        """Whether one more call fits under every ``(key, limit)``; ``None`` limits are unlimited."""
        used = self._used
        return all(limit is None or used.get(key, 0) < limit for key, limit in limits)

    def try_consume(self, limits: Sequence[tuple[BudgetKey, int | None]]) -> bool:
        """Spend one call under every key if all have room; otherwise spend nothing.

        Returns:
            ``True`` when the call was counted.
        """
        if not self.available(limits):
            return False
        used = self._used
        for key, _ in limits:
            used[key] = used.get(key, 0) + 1
        return True

    def try_reserve(self, amounts: Mapping[BudgetKey, tuple[int, int | None]]) -> bool:
        """Spend ``amount`` calls under each key at once if every ``(amount, limit)`` fits; else nothing.

        Used when a task delegates budget to a sub-agent: the delegated calls are reserved up front.
        """
        used = self._used
        if not all(limit is None or used.get(key, 0) + amount <= limit for key, (amount, limit) in amounts.items()):
            return False
        for key, (amount, _) in amounts.items():
            used[key] = used.get(key, 0) + amount
        return True

    def retain(self, task_ids: Iterable[str]) -> None:
        """Drop counters of tasks no longer declared."""
        keep = set(task_ids)
        for key in [k for k in self._used if k[0] not in keep]:
            del self._used[key]

    def snapshot(self) -> dict[BudgetKey, int]:
        """A copy of all counters."""
        return dict(self._used)
