"""Compile validated task declarations into the immutable :class:`~sidecar.policy.model.PolicyIndex`."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping

from sidecar.config.schema import EgressRuleSpec, SidecarConfig, TaskSpec
from sidecar.policy.model import Credential, EgressRule, PathMatcher, PolicyIndex, Task

__all__ = ["compile_policy", "task_anchor_time"]


def _rule_budget_key(spec: EgressRuleSpec) -> str:
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
    return "h:" + hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _compile_rule(index: int, spec: EgressRuleSpec, credential: str | None) -> EgressRule:
    methods = None if "*" in spec.methods else frozenset(spec.methods)
    return EgressRule(
        name=spec.name or f"egress[{index}]",
        budget_key=_rule_budget_key(spec),
        host=spec.host,
        port=spec.port,
        methods=methods,
        paths=PathMatcher.compile(spec.paths),
        audience=spec.audience,
        scope=spec.scope,
        max_calls=spec.max_calls,
        token=spec.token,
        credential=Credential(spec.credential.header, credential)
        if spec.credential is not None and credential is not None
        else None,
        tls=spec.tls,
        upstream_port=spec.upstream_port,
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


def compile_policy(
    settings: SidecarConfig,
    credentials: Mapping[tuple[int, int], str],
    first_seen: Callable[[str], float],
    agent: str,
) -> PolicyIndex:
    """Build the policy index.

    Args:
        settings: the validated configuration.
        agent: this agent's SPIFFE ID (from its SVID, or ``settings.agent``).
        credentials: ``(task_index, rule_index) -> secret value`` for rules with a ``credential``.
        first_seen: returns when a task id was first loaded (POSIX seconds), for ``ttl`` tasks.

    Returns:
        The immutable index; lookups cost O(1) in the number of tasks.
    """
    by_id: dict[str, Task] = {}
    by_agent: dict[str, list[Task]] = defaultdict(list)
    for t_index, spec in enumerate(settings.tasks):
        rules = tuple(
            _compile_rule(r_index, rule, credentials.get((t_index, r_index)))
            for r_index, rule in enumerate(spec.egress)
        )
        exact: dict[str, list[tuple[int, EgressRule]]] = defaultdict(list)
        suffix: dict[str, list[tuple[int, EgressRule]]] = defaultdict(list)
        for r_index, rule in enumerate(rules):
            if rule.host.startswith("*."):
                suffix[rule.host[1:]].append((r_index, rule))
            else:
                exact[rule.host].append((r_index, rule))
        not_before, expires_at = task_anchor_time(spec, first_seen(spec.id))
        fingerprint = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        task = Task(
            id=spec.id,
            agent=spec.agent,
            on_behalf_of=spec.on_behalf_of,
            purpose=spec.purpose,
            not_before=not_before,
            expires_at=expires_at,
            max_calls=spec.max_calls,
            revoked=spec.revoked,
            rules=rules,
            exact_hosts={k: tuple(v) for k, v in exact.items()},
            suffix_hosts={k: tuple(v) for k, v in suffix.items()},
            fingerprint=fingerprint,
        )
        by_id[task.id] = task
        by_agent[task.agent].append(task)
    return PolicyIndex(
        agent=agent,
        tasks_by_id=by_id,
        tasks_by_agent={agent: tuple(tasks) for agent, tasks in by_agent.items()},
    )
