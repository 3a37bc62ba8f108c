"""Compiled, immutable policy values: tasks, egress rules and the index that finds them.

Everything here is built once per configuration load (:mod:`sidecar.policy.compile`) and then only
read, so a reload swaps the whole :class:`PolicyIndex` with one assignment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.decision import Reason

if TYPE_CHECKING:
    from sidecar.agentproto.rules import ProtocolPolicy
    from sidecar.grants.model import Grant

__all__ = ["Credential", "EgressRule", "PathMatcher", "PolicyIndex", "Task", "task_state"]


@dataclass(frozen=True, slots=True)
class PathMatcher:
    """Matches canonical paths against exact paths and ``/prefix/*`` patterns.

    Attributes:
        exact: paths that match exactly.
        prefixes: each ends with ``/``; a path matches when it starts with one and is longer.
        any: the pattern ``*`` was given.
    """

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    any: bool

    @classmethod
    def compile(cls, patterns: list[str]) -> PathMatcher:
        """Build a matcher from validated patterns (see :class:`~sidecar.config.schema.EgressRuleSpec`)."""
        exact = frozenset(p for p in patterns if p != "*" and not p.endswith("/*"))
        prefixes = tuple(sorted({p[:-1] for p in patterns if p.endswith("/*")}))
        return cls(exact, prefixes, "*" in patterns)

    def matches(self, path: str) -> bool:
        """Whether the canonical ``path`` is allowed.

        A prefix ends with ``/``, so "starts with it and is longer" is "starts with it and is not it";
        ``str.startswith`` takes the whole tuple at once.
        """
        if self.any or path in self.exact:
            return True
        return bool(self.prefixes) and path.startswith(self.prefixes) and path not in self.prefixes


@dataclass(frozen=True, slots=True)
class Credential:
    """An API key injected into ``header``. ``value`` is secret: it is excluded from ``repr``."""

    header: str
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One compiled egress rule.

    Attributes:
        name: the rule's name, or ``egress[i]``.
        budget_key: identifies the rule's call counter across reloads (its name, or a hash of what it
            matches, so raising ``max_calls`` keeps the count).
        host: exact host or ``*.suffix``.
        port: destination port the agent must name; ``None`` means the scheme's default port.
        methods: upper-case methods; ``None`` means any.
        audience / scope: claims of the minted token; ``audience`` ``None`` means ``scheme://host[:port]``.
        max_calls: calls allowed for this rule over the task's life; ``None`` means unlimited.
        token: whether a task-scoped token is injected as ``Authorization: Bearer``.
        credential: a static API key to inject, if any.
        tls: ``none`` (plain HTTP), ``passthrough`` (a TLS connection judged on SNI; never matches
            an HTTP request) or ``originate`` (HTTP from the agent, TLS from Envoy to the upstream).
        upstream_port: with ``originate``, the upstream TLS port (default 443).
        rpc: with ``protocol: mcp`` / ``a2a``, the compiled JSON-RPC rules; ``None`` for plain HTTP.
    """

    name: str
    budget_key: str
    host: str
    port: int | None
    methods: frozenset[str] | None
    paths: PathMatcher
    audience: str | None
    scope: str | None
    max_calls: int | None
    token: bool
    credential: Credential | None
    tls: str = "none"
    upstream_port: int | None = None
    rpc: ProtocolPolicy | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """One compiled task.

    Attributes:
        id / agent / on_behalf_of / purpose: from the declaration.
        not_before / expires_at: validity as POSIX seconds (UTC).
        max_calls: calls allowed across all rules; ``None`` means unlimited.
        revoked: set by ``revoked: true``; denies every call.
        rules: all rules in declaration order.
        exact_hosts / suffix_hosts: ``host -> ((index, rule), ...)``; suffix keys start with ``.``.
        fingerprint: hash of the declaration; cached tokens are keyed by it.
        txn: the ``txn`` of tokens minted under the task: its id, or the root grant's id.
        token_subject: ``sub`` of those tokens: ``on_behalf_of``, else the (root) agent.
        token_actor: their ``act`` claim, current actor outermost (RFC 8693 §4.1).
        act_chain: the actors' SPIFFE IDs, current first.
        grant: the verified grant the task comes from, or ``None`` for a ``sidecar.yaml`` task.
    """

    id: str
    agent: str
    on_behalf_of: str | None
    purpose: str
    not_before: float
    expires_at: float
    max_calls: int | None
    revoked: bool
    rules: tuple[EgressRule, ...]
    exact_hosts: Mapping[str, tuple[tuple[int, EgressRule], ...]]
    suffix_hosts: Mapping[str, tuple[tuple[int, EgressRule], ...]]
    fingerprint: str
    txn: str
    token_subject: str
    token_actor: Mapping[str, Any]
    act_chain: tuple[str, ...]
    grant: Grant | None = None

    def rules_for_host(self, host: str) -> tuple[EgressRule, ...]:
        """Rules whose host pattern matches ``host``, in declaration order. O(number of labels)."""
        exact = self.exact_hosts.get(host, ())
        if not self.suffix_hosts:
            return tuple(rule for _, rule in exact)
        found = list(exact)
        dot = host.find(".")
        while dot >= 0:
            found.extend(self.suffix_hosts.get(host[dot:], ()))
            dot = host.find(".", dot + 1)
        if len(found) > len(exact):
            found.sort(key=lambda item: item[0])
        return tuple(rule for _, rule in found)


def task_state(task: Task, now: float, feed_stale: str | None = None) -> Reason | None:
    """Why ``task`` cannot allow anything at ``now`` (POSIX seconds): ``task_revoked``,
    ``task_not_yet_valid``, ``task_expired`` or, while the revocation feed is stale (``feed_stale``
    ``delegated``: tasks from delegated grants; ``all``: every task), ``revocation_feed_stale``;
    ``None`` while it is active."""
    if task.revoked:
        return Reason.TASK_REVOKED
    if now < task.not_before:
        return Reason.TASK_NOT_YET_VALID
    if now >= task.expires_at:
        return Reason.TASK_EXPIRED
    if feed_stale is not None and (feed_stale == "all" or (task.grant is not None and task.grant.depth > 0)):
        return Reason.REVOCATION_FEED_STALE
    return None


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    """All tasks, indexed by id and by agent SPIFFE ID.

    Attributes:
        agent: the local agent's SPIFFE ID (the egress caller).
        tasks_by_id: task id to task.
        tasks_by_agent: agent SPIFFE ID to that agent's tasks, in declaration order.
        exact_hosts / suffix_hosts: ``(agent, host)`` and ``(agent, ".suffix")`` to the tasks with a
            rule naming it, so that choosing among many tasks costs O(tasks naming the host).
    """

    agent: str
    tasks_by_id: Mapping[str, Task]
    tasks_by_agent: Mapping[str, tuple[Task, ...]]
    exact_hosts: Mapping[tuple[str, str], tuple[Task, ...]] = field(default_factory=dict)
    suffix_hosts: Mapping[tuple[str, str], tuple[Task, ...]] = field(default_factory=dict)

    def tasks_for_host(self, agent: str, host: str) -> tuple[Task, ...]:
        """``agent``'s tasks with a rule for ``host`` (exact or ``*.suffix``), in declaration order."""
        found = list(self.exact_hosts.get((agent, host), ()))
        if self.suffix_hosts:
            dot = host.find(".")
            while dot >= 0:
                found.extend(self.suffix_hosts.get((agent, host[dot:]), ()))
                dot = host.find(".", dot + 1)
        if len(found) < 2:
            return tuple(found)
        order = {id(t): i for i, t in enumerate(self.tasks_by_agent.get(agent, ()))}
        unique = {id(t): t for t in found}
        return tuple(sorted(unique.values(), key=lambda t: order[id(t)]))
