"""The compiled policy holds each distinct immutable value once, and still decides as declared."""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

from sidecar.config.schema import TaskSpec
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.model import PathMatcher, PolicyIndex
from tests.support.config import AGENT, task


def rule(j: int, host: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"r{j}",
        "host": host,
        "methods": ["GET", "POST"],
        "paths": [f"/api/v{j}/*"],
        "scope": "read",
    } | extra


def policy(count: int, rules: int = 10) -> PolicyIndex:
    sources = [
        TaskSource(
            TaskSpec.model_validate(task(f"task-{i}", egress=[rule(j, f"t{i}.svc.internal") for j in range(rules)]))
        )
        for i in range(count)
    ]
    return compile_policy(sources, lambda _: 1000.0, AGENT)


def deep_size(root: object) -> int:
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def test_equal_values_are_one_object_across_rules_and_tasks() -> None:
    index = policy(3)
    first, second = index.tasks_by_id["task-0"], index.tasks_by_id["task-1"]
    for a, b in zip(first.rules, second.rules, strict=True):
        assert a.methods == frozenset({"GET", "POST"}) and a.methods is b.methods
        assert a.paths is b.paths and a.name is b.name and a.scope is b.scope
        assert a.host == "t0.svc.internal" and b.host == "t1.svc.internal"
    assert len({id(r.host) for r in first.rules}) == 1  # one host string for the task's ten rules
    assert len({id(r.methods) for t in index.tasks_by_id.values() for r in t.rules}) == 1
    assert first.agent is second.agent is first.act_chain[0]


def test_shared_values_decide_as_declared() -> None:
    sources = [
        TaskSource(TaskSpec.model_validate(task("a", egress=[rule(1, "a.internal"), rule(2, "a.internal")]))),
        TaskSource(TaskSpec.model_validate(task("b", egress=[rule(1, "b.internal", methods=["GET"], paths=["/x"])]))),
    ]
    index = compile_policy(sources, lambda _: 1000.0, AGENT)
    a1, a2 = index.tasks_by_id["a"].rules
    (b1,) = index.tasks_by_id["b"].rules
    assert a1.paths.matches("/api/v1/items") and not a1.paths.matches("/api/v2/items")
    assert a2.paths.matches("/api/v2/items") and not a2.paths.matches("/x")
    assert b1.methods == frozenset({"GET"}) and b1.paths.matches("/x") and not b1.paths.matches("/api/v1/items")
    assert b1.name is a1.name and b1.methods is not a1.methods and b1.paths is not a1.paths
    assert index.tasks_for_host(AGENT, "a.internal") == (index.tasks_by_id["a"],)


def test_a_matcher_without_exact_paths_holds_no_set_of_its_own() -> None:
    assert PathMatcher.compile(["/a/*"]).exact is PathMatcher.compile(["*"]).exact == frozenset()
    assert PathMatcher.compile(["/a", "/b/*"]).exact == frozenset({"/a"})


def test_the_compiled_policy_grows_by_a_few_hundred_bytes_a_rule() -> None:
    """1,000 rules more cost the rule objects and their index entries, not copies of equal values
    (1,247 bytes a rule when each rule held its own sets, matchers and strings)."""
    small, large = deep_size(policy(10)), deep_size(policy(110))
    per_rule = (large - small) / (100 * 10)
    assert per_rule < 450, per_rule
