"""Compile task declarations into the immutable :class:`~sidecar.policy.model.PolicyIndex`.

Tasks come from two sources with one shape: ``tasks:`` in ``sidecar.yaml`` and verified grants
(:mod:`sidecar.grants`). Both arrive here as :class:`TaskSource` values.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sidecar.agentproto.names import NameSet
from sidecar.agentproto.rules import Constraint, compile_protocol
from sidecar.config.schema import SENSITIVITY_LEVELS, ApprovalSpec, EgressRuleSpec, SensitivitySpec, TaskSpec
from sidecar.grants.model import Grant
from sidecar.policy.model import (
    ApprovalRule,
    Credential,
    EgressRule,
    PathMatcher,
    PolicyIndex,
    QuarantineRule,
    Task,
)

__all__ = ["TaskSource", "compile_policy", "rule_budget_key", "task_anchor_time"]

_T = TypeVar("_T")


class _Shared:
    """One object for each distinct immutable value of one compiled policy (strings, method sets, path
    matchers): 1,000 tasks of 10 rules name the same methods, paths, scopes and rule names, and each
    task's rules the same host, so most values are held once instead of per rule (a ``frozenset`` of
    two methods alone is 216 bytes)."""

    def __init__(self) -> None:
        self._values: dict[object, object] = {}
        self._paths: dict[tuple[str, ...], PathMatcher] = {}

    def __call__(self, value: _T) -> _T:
        """``value``, or the equal value seen first (``None`` stays ``None``)."""
        if value is None:
            return value
        return self._values.setdefault(value, value)  # type: ignore[return-value]  # an equal value of the same type

    def paths(self, patterns: list[str]) -> PathMatcher:
        """The (shared) matcher of these patterns."""
        key = tuple(patterns)
        found = self._paths.get(key)
        if found is None:
            found = self._paths[key] = PathMatcher.compile(patterns)
        return found


@dataclass(frozen=True)
class TaskSource:
    """One task to compile.

    Attributes:
        spec: the declaration.
        credentials: rule index -> the credential to inject (already read from its file).
        grant: the verified grant the task comes from, or ``None`` for a ``sidecar.yaml`` task.
        revoked: revoked by a revocation list (``spec.revoked`` is honoured as well).
    """

    spec: TaskSpec
    credentials: Mapping[int, Credential] = field(default_factory=dict)
    grant: Grant | None = None
    revoked: bool = False


def rule_budget_key(spec: EgressRuleSpec) -> str:
    """The key of a rule's call counter: its name, or a hash of what it matches (stable across reloads)."""
    if spec.name:
        return spec.name
    shape: dict[str, object] = {
        "host": spec.host,
        "port": spec.port,
        "methods": sorted(spec.methods),
        "paths": sorted(spec.paths),
    }
    if spec.tls != "none":
        shape["tls"] = spec.tls
    if spec.protocol != "http":
        shape["protocol"] = spec.protocol
    return "h:" + hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _compile_approval(spec: EgressRuleSpec) -> ApprovalRule | None:
    approval = spec.approval
    if approval is None:
        return None
    if not isinstance(approval, ApprovalSpec):
        return ApprovalRule()
    methods = None if approval.methods is None or "*" in approval.methods else frozenset(approval.methods)
    tools = NameSet.compile(approval.tools) if approval.tools is not None else None
    arguments = tuple(Constraint.compile(p, c) for p, c in (approval.arguments or {}).items())
    return ApprovalRule(methods, tools, arguments)


def _level(label: str | None) -> int | None:
    return None if label is None else SENSITIVITY_LEVELS.index(label)


def _compile_rule(index: int, spec: EgressRuleSpec, credential: Credential | None, shared: _Shared) -> EgressRule:
    methods = None if "*" in spec.methods else shared(frozenset(spec.methods))
    budget_key = shared(rule_budget_key(spec))
    return EgressRule(
        name=shared(spec.name or f"egress[{index}]"),
        budget_key=budget_key,
        host=shared(spec.host),
        port=spec.port,
        methods=methods,
        paths=shared.paths(spec.paths),
        audience=shared(spec.audience),
        scope=shared(spec.scope),
        max_calls=spec.max_calls,
        token=spec.token,
        credential=credential,
        tls=spec.tls,
        upstream_port=spec.upstream_port,
        rpc=compile_protocol(spec, budget_key),
        sensitivity=_level(spec.sensitivity),
        approval=_compile_approval(spec),
    )


def task_anchor_time(spec: TaskSpec, first_seen: float) -> tuple[float, float]:
    """Validity window ``(not_before, expires_at)`` in POSIX seconds.

    ``ttl`` counts from ``not_before`` when set, else from ``first_seen`` (the first load of the task
    by this process), so a reload never extends a task.
    """
    not_before = spec.not_before.timestamp() if spec.not_before is not None else float("-inf")
    if spec.expires_at is not None:
        return not_before, spec.expires_at.timestamp()
    assert spec.ttl is not None  # guaranteed by TaskSpec validation
    start = spec.not_before.timestamp() if spec.not_before is not None else first_seen
    return not_before, start + spec.ttl


def _compile_task(source: TaskSource, first_seen: Callable[[str], float], shared: _Shared) -> Task:
    spec, grant = source.spec, source.grant
    rules = tuple(_compile_rule(i, rule, source.credentials.get(i), shared) for i, rule in enumerate(spec.egress))
    exact: dict[str, list[tuple[int, EgressRule]]] = defaultdict(list)
    suffix: dict[str, list[tuple[int, EgressRule]]] = defaultdict(list)
    for index, rule in enumerate(rules):
        if rule.host.startswith("*."):
            suffix[rule.host[1:]].append((index, rule))
        else:
            exact[rule.host].append((index, rule))
    not_before, expires_at = task_anchor_time(spec, first_seen(spec.id))
    fingerprint = hashlib.sha256((spec.model_dump_json() + str(source.revoked)).encode()).hexdigest()[:16]
    actor: dict[str, Any]
    chain: tuple[str, ...]
    if grant is None:
        agent = shared(spec.agent)
        txn, actor, chain, root_subject = spec.id, {"sub": agent}, (agent,), agent
        lineage: tuple[tuple[str, str, str], ...] = ((spec.id, spec.agent, ""),)
    else:
        txn, actor, chain, root_subject = grant.txn, grant.act_claim(), grant.actors, grant.actors[-1]
        lineage = tuple((link.id, link.subject, link.signer) for link in grant.chain)
    anomaly = spec.quarantine
    return Task(
        id=spec.id,
        agent=shared(spec.agent),
        on_behalf_of=shared(spec.on_behalf_of),
        purpose=shared(spec.purpose),
        not_before=not_before,
        expires_at=expires_at,
        max_calls=spec.max_calls,
        revoked=spec.revoked or source.revoked,
        rules=rules,
        exact_hosts={k: tuple(v) for k, v in exact.items()},
        suffix_hosts={k: tuple(v) for k, v in suffix.items()},
        fingerprint=fingerprint,
        txn=txn,
        token_subject=spec.on_behalf_of or root_subject,
        token_actor=actor,
        act_chain=chain,
        grant=grant,
        max_sensitivity=_level(spec.max_sensitivity),
        quarantine=QuarantineRule(anomaly.threshold, anomaly.window) if anomaly is not None else None,
        lineage=lineage,
    )


def compile_policy(
    sources: Sequence[TaskSource],
    first_seen: Callable[[str], float],
    agent: str,
    sensitivity: SensitivitySpec | None = None,
) -> PolicyIndex:
    """Build the policy index.

    Args:
        sources: the tasks (ids must be unique).
        first_seen: returns when a task id was first loaded (POSIX seconds), for ``ttl`` tasks.
        agent: this agent's SPIFFE ID (from its SVID, or ``settings.agent``).
        sensitivity: the hosts' labels and the default label (``sensitivity``); default: none, ``internal``.

    Returns:
        The immutable index; lookups cost O(1) in the number of tasks.
    """
    by_id: dict[str, Task] = {}
    by_agent: dict[str, list[Task]] = defaultdict(list)
    exact: dict[tuple[str, str], list[Task]] = defaultdict(list)
    suffix: dict[tuple[str, str], list[Task]] = defaultdict(list)
    shared = _Shared()
    for source in sources:
        task = _compile_task(source, first_seen, shared)
        by_id[task.id] = task
        by_agent[task.agent].append(task)
        for host in task.exact_hosts:
            exact[(task.agent, host)].append(task)
        for host in task.suffix_hosts:
            suffix[(task.agent, host)].append(task)
    labels = sensitivity if sensitivity is not None else SensitivitySpec()
    return PolicyIndex(
        agent=agent,
        tasks_by_id=by_id,
        tasks_by_agent={a: tuple(tasks) for a, tasks in by_agent.items()},
        exact_hosts={k: tuple(v) for k, v in exact.items()},
        suffix_hosts={k: tuple(v) for k, v in suffix.items()},
        host_labels={host.removeprefix("*"): SENSITIVITY_LEVELS.index(level) for host, level in labels.hosts.items()},
        default_label=SENSITIVITY_LEVELS.index(labels.default),
    )
