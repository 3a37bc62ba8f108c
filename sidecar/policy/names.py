"""The DNS decision: may the local agent resolve this name?

A name resolves when an active task of the local agent has a rule for it - an exact host, or a
``*.suffix`` host it ends with (any ``tls`` mode: the agent must resolve a name to connect to it) -
or when ``dns.allow`` lists it (the names the pod needs besides its tasks, e.g. the cluster's
services). Everything else is ``dns_not_allowed``: the query is refused, never forwarded, so a name
cannot carry data out of the pod through the resolvers. The query type does not matter: an allowed
name is asked about as the agent asks (``A``, ``AAAA``, ``HTTPS``, ``TXT``...).

Names are compared in canonical form (:func:`~sidecar.http_norm.normalize_authority`: lower case, no
trailing dot, LDH labels and ``_``); a name that is not a host name (binary labels, the root) is
never allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from sidecar.decision import Decision, Direction, Protocol, Reason
from sidecar.errors import BadRequestError
from sidecar.http_norm import normalize_authority
from sidecar.policy.model import Blocks, PolicyIndex, task_state

__all__ = ["NameList", "decide_name"]

_HOST_TEXT = re.compile(r"^[A-Za-z0-9_.-]{1,254}$")


@dataclass(frozen=True, slots=True)
class NameList:
    """Exact names and ``.suffix`` es (from ``*.suffix`` patterns) that always resolve.

    Attributes:
        exact: canonical names.
        suffixes: each starts with ``.``; a name matches when it ends with one (not the suffix itself).
    """

    exact: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> NameList:
        """From validated ``dns.allow`` patterns (lower case, no trailing dot)."""
        names = list(patterns)
        exact = frozenset(p for p in names if not p.startswith("*."))
        suffixes = tuple(sorted({p[1:] for p in names if p.startswith("*.")}))
        return cls(exact, suffixes)

    def matches(self, name: str) -> bool:
        """Whether the canonical ``name`` is listed."""
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))


def decide_name(
    policy: PolicyIndex,
    allowed: NameList,
    name: str,
    qtype: str,
    *,
    now: float,
    decision_id: str,
    destination: str = "",
    blocks: Blocks | None = None,
    feed_stale: str | None = None,
) -> Decision:
    """Decide one DNS query of the local agent.

    Args:
        policy: the active compiled policy.
        allowed: ``dns.allow``.
        name: the query name as text (``dns.name.Name.to_text``; escapes kept).
        qtype: the query type's mnemonic (``A``, ``AAAA``, ...), recorded.
        now: POSIX seconds.
        decision_id: id to put on the decision.
        destination: the address the query was sent to, when known (TCP), recorded.
        blocks / feed_stale: the freeze ladder's blocks and the revocation feed's staleness (a
            task they stop has names that do not resolve, :func:`~sidecar.policy.model.task_state`).

    Returns:
        A :class:`Decision` with ``protocol: dns``, ``host`` the canonical name (or the raw one,
        cut at 253 characters, when it is not a host name) and ``http_status`` 0: allowed (``rule``
        the task's rule, or ``dns.allow``) or ``dns_not_allowed``.
    """
    base = Decision(
        False,
        Reason.DNS_NOT_ALLOWED,
        0,
        decision_id,
        "",
        Direction.EGRESS,
        agent=policy.agent,
        protocol=Protocol.DNS,
        qtype=qtype[:16],
        destination=destination[:64],
        host=name[:253],
    )
    if not _HOST_TEXT.match(name):  # no port, no escaped byte: what a resolver would send on as it is
        return replace(base, detail="not a host name")
    try:
        host, _ = normalize_authority(name.removesuffix("."), "http")
    except BadRequestError:
        return replace(base, detail="not a host name")
    base = replace(base, host=host)
    if allowed.matches(host):
        return replace(base, allow=True, reason=Reason.ALLOWED, rule="dns.allow")
    named = policy.tasks_for_host(policy.agent, host)
    for task in named:
        if task_state(task, now, feed_stale, blocks=blocks) is None:
            rule = task.rules_for_host(host)[0]
            return replace(base, allow=True, reason=Reason.ALLOWED, task_id=task.id, rule=rule.name)
    if named:
        state = task_state(named[0], now, feed_stale, blocks=blocks)
        detail = f"the tasks naming it are not active (first: {state.value if state else 'unknown'})"
        return replace(base, detail=detail, task_id=named[0].id)
    return replace(base, detail="no active rule of this agent names it, nor dns.allow")
