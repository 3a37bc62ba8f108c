"""Which ``host:port`` pairs are intercepted right now: those an active task's ``tls: intercept`` rule names.

The set changes when tasks are added, revoked or reloaded (a new policy) and when a task's
``not_before`` or ``expires_at`` passes (time alone). :func:`active_targets` returns the set and the
next instant it can change by time alone, so the caller can wake up exactly then.
"""

from __future__ import annotations

import math

from sidecar.bootstrap.names import InterceptTarget
from sidecar.policy.model import PolicyIndex, task_state

__all__ = ["active_targets"]

_HTTPS_PORT = 443


def active_targets(policy: PolicyIndex, now: float) -> tuple[frozenset[InterceptTarget], float]:
    """The targets of this agent's active tasks, and when the set may next change by time alone.

    Args:
        policy: the compiled policy (only ``policy.agent``'s tasks count).
        now: POSIX seconds.

    Returns:
        ``(targets, next_change)``: ``next_change`` is the earliest future ``not_before`` or
        ``expires_at`` of a task with an ``intercept`` rule (POSIX seconds), ``math.inf`` if none.
    """
    targets: set[InterceptTarget] = set()
    next_change = math.inf
    for task in policy.tasks_by_agent.get(policy.agent, ()):
        rules = [rule for rule in task.rules if rule.tls == "intercept"]
        if not rules or task.revoked:
            continue
        for instant in (task.not_before, task.expires_at):
            if now < instant < next_change:
                next_change = instant
        if task_state(task, now) is not None:
            continue
        for rule in rules:
            port = rule.port or _HTTPS_PORT
            targets.add(InterceptTarget(rule.host, port, rule.upstream_port or port))
    return frozenset(targets), next_change
