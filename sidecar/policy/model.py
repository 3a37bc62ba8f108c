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
    from sidecar.agentproto.names import NameSet
    from sidecar.agentproto.rules import Constraint, ProtocolPolicy
    from sidecar.grants.model import Grant

__all__ = [
    "SENSITIVITY_NAMES",
    "ApprovalRule",
    "Blocks",
    "Credential",
    "EgressRule",
    "PathMatcher",
    "PolicyIndex",
    "QuarantineRule",
    "Task",
    "task_state",
]

SENSITIVITY_NAMES = ("public", "internal", "confidential", "restricted")
"""The labels by level: a compiled label is its index here (``0`` is ``public``)."""

_NO_PATHS: frozenset[str] = frozenset()
"""The ``exact`` of every matcher without exact paths (one object: an empty ``frozenset`` is 216 bytes)."""

Blocks = Mapping[str, tuple[Reason, str]]
"""Task id -> why the freeze ladder blocks it: ``task_quarantined`` (frozen) or ``task_revoked``
(killed), with a detail naming the action (:mod:`sidecar.control.ladder`)."""


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
        exact = frozenset(p for p in patterns if p != "*" and not p.endswith("/*")) or _NO_PATHS
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
class ApprovalRule:
    """Which calls of a rule wait for a human approval (``approval`` of the rule).

    Attributes:
        methods: only these HTTP methods; ``None``: any.
        tools: only MCP ``tools/call`` of these names; ``None``: any call.
        arguments: only ``tools/call`` whose arguments satisfy all of these; empty: any.
    """

    methods: frozenset[str] | None = None
    tools: NameSet | None = None
    arguments: tuple[Constraint, ...] = ()

    def applies(self, method: str, tool: str | None, arguments: Mapping[str, Any] | None) -> bool:
        """Whether a call with this method, MCP tool (``None``: not a ``tools/call``) and arguments waits."""
        if self.methods is not None and method not in self.methods:
            return False
        if self.tools is not None and (tool is None or not self.tools.matches(tool)):
            return False
        if self.arguments:
            return arguments is not None and all(c.holds(arguments) for c in self.arguments)
        return True


@dataclass(frozen=True, slots=True)
class QuarantineRule:
    """A compiled anomaly rule: ``threshold`` counted denials within ``window`` seconds."""

    threshold: int
    window: float


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
        sensitivity: the rule's own label as a level (index into :data:`SENSITIVITY_NAMES`), or
            ``None`` (then the host's label or the default counts).
        approval: which of its calls wait for a human approval; ``None``: none.
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
    sensitivity: int | None = None
    approval: ApprovalRule | None = None


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
        max_sensitivity: the highest label level the task may touch; ``None``: any.
        quarantine: the task's own anomaly rule (from its declaration or grant), or ``None``.
        lineage: ``(task id, agent, signer of its grant)`` of this task and every task it was
            delegated from, this one first (a ``sidecar.yaml`` task: itself only, signer ``""``):
            what a freeze or kill may name, and who had authority to.
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
    max_sensitivity: int | None = None
    quarantine: QuarantineRule | None = None
    lineage: tuple[tuple[str, str, str], ...] = ()

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


def task_state(task: Task, now: float, feed_stale: str | None = None, *, blocks: Blocks | None = None) -> Reason | None:
    """Why ``task`` cannot allow anything at ``now`` (POSIX seconds): ``task_revoked`` (also when the
    ladder killed it), ``task_not_yet_valid``, ``task_expired``, ``task_quarantined`` (frozen) or,
    while the revocation feed is stale (``feed_stale`` ``delegated``: tasks from delegated grants;
    ``all``: every task), ``revocation_feed_stale``;
    ``None`` while it is active."""
    if task.revoked:
        return Reason.TASK_REVOKED
    block = blocks.get(task.id) if blocks else None
    if block is not None and block[0] is Reason.TASK_REVOKED:
        return Reason.TASK_REVOKED
    if now < task.not_before:
        return Reason.TASK_NOT_YET_VALID
    if now >= task.expires_at:
        return Reason.TASK_EXPIRED
    if block is not None:
        return block[0]
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
        host_labels: exact host or ``.suffix`` -> sensitivity level (``sensitivity.hosts``).
        default_label: the level of a call whose rule and host carry no label.
    """

    agent: str
    tasks_by_id: Mapping[str, Task]
    tasks_by_agent: Mapping[str, tuple[Task, ...]]
    exact_hosts: Mapping[tuple[str, str], tuple[Task, ...]] = field(default_factory=dict)
    suffix_hosts: Mapping[tuple[str, str], tuple[Task, ...]] = field(default_factory=dict)
    host_labels: Mapping[str, int] = field(default_factory=dict)
    default_label: int = 1

    def host_label(self, host: str) -> int | None:
        """The level ``sensitivity.hosts`` gives ``host``: its exact entry, else the longest
        ``*.suffix`` entry; ``None`` when none names it."""
        labels = self.host_labels
        if not labels:
            return None
        found = labels.get(host)
        if found is not None:
            return found
        dot = host.find(".")
        while dot >= 0:
            found = labels.get(host[dot:])
            if found is not None:
                return found
            dot = host.find(".", dot + 1)
        return None

    def label(self, host: str, rule: EgressRule | None) -> int:
        """The sensitivity level of a call to ``host`` under ``rule``: the higher of the rule's and the
        host's label, else :attr:`default_label`."""
        own = rule.sensitivity if rule is not None else None
        if own is None and not self.host_labels:
            return self.default_label
        by_host = self.host_label(host)
        if own is None and by_host is None:
            return self.default_label
        return max(-1 if own is None else own, -1 if by_host is None else by_host)

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
