"""Attenuation: accepted sub-grants are never wider than their parent (hypothesis property test)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config.schema import EgressRuleSpec, TaskSpec
from sidecar.grants.attenuation import AttenuationError, check_attenuation, host_within, path_within
from sidecar.http_norm import Target
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.engine import _match

AGENT = "spiffe://example.org/ns/a/sa/parent"
CHILD = "spiffe://example.org/ns/a/sa/child"
WINDOW = (1_000.0, 2_000.0)

HOSTS = ["a.x.com", "b.x.com", "x.com", "*.x.com", "*.b.x.com", "c.b.x.com", "y.org", "*.y.org"]
PATTERNS = ["*", "/a", "/a/*", "/a/b", "/a/b/*", "/a/bc", "/b/*", "/a/b/c"]
METHODS = ["GET", "POST", "DELETE"]


def rule(**kw: Any) -> EgressRuleSpec:
    base: dict[str, Any] = {"host": "a.x.com", "methods": ["GET"], "paths": ["/a/*"]}
    base.update(kw)
    return EgressRuleSpec.model_validate(base)


def task(agent: str, rules: list[EgressRuleSpec], **kw: Any) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "id": "t",
            "agent": agent,
            "purpose": "p",
            "expires_at": "2030-01-01T00:00:00Z",
            "egress": [r.model_dump(exclude_none=True) for r in rules],
            **kw,
        }
    )


rules_strategy = st.builds(
    lambda host, port, methods, paths, max_calls, scope: rule(
        host=host, port=port, methods=methods, paths=paths, max_calls=max_calls, scope=scope
    ),
    st.sampled_from(HOSTS),
    st.sampled_from([None, 80, 8080]),
    st.lists(st.sampled_from([*METHODS, "*"]), min_size=1, max_size=3, unique=True),
    st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3, unique=True),
    st.sampled_from([None, 1, 5]),
    st.sampled_from([None, "r", "r w"]),
)

requests_strategy = st.tuples(
    st.sampled_from(["a.x.com", "b.x.com", "x.com", "c.b.x.com", "d.c.b.x.com", "y.org", "z.y.org"]),
    st.sampled_from([80, 8080]),
    st.sampled_from(METHODS),
    st.sampled_from(["/a", "/a/", "/a/b", "/a/b/c", "/a/bc", "/b/x", "/c", "/a/b/c/d"]),
)


def allows(spec: TaskSpec, request: tuple[str, int, str, str]) -> bool:
    index = compile_policy([TaskSource(spec)], lambda _: 0.0, spec.agent)
    host, port, method, path = request
    return bool(_match(index.tasks_by_id["t"], Target(host, port, path, ""), method).rules)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    parent_rules=st.lists(rules_strategy, min_size=1, max_size=3),
    child_rules=st.lists(rules_strategy, min_size=1, max_size=3),
    requests=st.lists(requests_strategy, min_size=1, max_size=25),
)
def test_no_accepted_child_is_wider_than_its_parent(
    parent_rules: list[EgressRuleSpec], child_rules: list[EgressRuleSpec], requests: list[tuple[str, int, str, str]]
) -> None:
    parent = task(AGENT, parent_rules)
    child = task(CHILD, child_rules)
    try:
        holders = check_attenuation(parent, child, parent_window=WINDOW, child_window=WINDOW)
    except AttenuationError:
        return
    for request in requests:
        if allows(child, request):
            assert allows(parent, request), (request, child_rules, parent_rules)
    for c_index, p_index in holders.items():
        parent_limit = parent.egress[p_index].max_calls
        if parent_limit is not None:
            child_limit = child.egress[c_index].max_calls
            assert child_limit is not None and child_limit <= parent_limit


def narrow(**kw: Any) -> EgressRuleSpec:
    """A child rule that fits the parent below except for what ``kw`` changes."""
    return rule(**{"scope": "r", "max_calls": 1, **kw})


@pytest.mark.parametrize(
    ("child", "field"),
    [
        (narrow(host="b.x.com"), "egress[0].host"),
        (narrow(port=8080), "egress[0].port"),
        (narrow(tls="originate"), "egress[0].tls"),
        (narrow(methods=["GET", "DELETE"]), "egress[0].methods"),
        (narrow(methods=["*"]), "egress[0].methods"),
        (narrow(paths=["/b/*"]), "egress[0].paths"),
        (narrow(paths=["*"]), "egress[0].paths"),
        (narrow(token=False), "egress[0].token"),
        (narrow(audience="https://elsewhere"), "egress[0].audience"),
        (narrow(scope="r admin"), "egress[0].scope"),
        (narrow(scope=None), "egress[0].scope"),
        (narrow(credential="paid-api"), "egress[0].credential"),
        (narrow(name="greedy", max_calls=None), "egress[0] (greedy).max_calls"),
        (narrow(max_calls=11), "egress[0].max_calls"),
    ],
)
def test_each_widening_is_named(child: EgressRuleSpec, field: str) -> None:
    parent = task(AGENT, [rule(name="reads", scope="r w", max_calls=10)])
    check_attenuation(parent, task(CHILD, [narrow()]), parent_window=WINDOW, child_window=WINDOW)
    with pytest.raises(AttenuationError) as info:
        check_attenuation(parent, task(CHILD, [child]), parent_window=WINDOW, child_window=WINDOW)
    assert info.value.field == field
    assert "reads" in str(info.value)  # names the closest parent rule


def test_narrower_child_is_accepted_and_mapped_to_its_parent_rule() -> None:
    parent = task(AGENT, [rule(name="a"), rule(name="b", host="*.y.org", methods=["*"], paths=["*"])])
    child = task(CHILD, [rule(host="z.y.org", methods=["POST"], paths=["/q/*"]), rule(paths=["/a/b"])])
    assert check_attenuation(parent, child, parent_window=WINDOW, child_window=WINDOW) == {0: 1, 1: 0}


@pytest.mark.parametrize(
    ("kw", "window", "field"),
    [
        ({"on_behalf_of": "user:mallory"}, WINDOW, "on_behalf_of"),
        ({}, (1_000.0, 2_001.0), "expires_at"),
        ({}, (999.0, 2_000.0), "not_before"),
    ],
)
def test_task_level_widening(kw: dict[str, Any], window: tuple[float, float], field: str) -> None:
    parent = task(AGENT, [rule()], on_behalf_of="user:jane")
    child_kw = {"on_behalf_of": "user:jane", **kw}
    with pytest.raises(AttenuationError) as info:
        check_attenuation(parent, task(CHILD, [rule()], **child_kw), parent_window=WINDOW, child_window=window)
    assert info.value.field == field


def test_task_budget_against_what_is_left() -> None:
    parent = task(AGENT, [rule()], max_calls=10)
    child = task(CHILD, [rule()], max_calls=6)
    check_attenuation(parent, child, parent_window=WINDOW, child_window=WINDOW)
    with pytest.raises(AttenuationError, match="max_calls"):
        check_attenuation(
            parent, child, parent_window=WINDOW, child_window=WINDOW, remaining=lambda i: 5 if i is None else None
        )
    with pytest.raises(AttenuationError, match="max_calls"):
        check_attenuation(parent, task(CHILD, [rule()]), parent_window=WINDOW, child_window=WINDOW)


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        ("a.x.com", "*.x.com", True),
        ("*.b.x.com", "*.x.com", True),
        ("x.com", "*.x.com", False),
        ("ax.com", "*.x.com", False),
        ("*.x.com", "a.x.com", False),
        ("*.com", "*.x.com", False),
    ],
)
def test_host_within(child: str, parent: str, expected: bool) -> None:
    assert host_within(child, parent) is expected


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        ("/a/b", "/a/*", True),
        ("/a", "/a/*", False),
        ("/a/b/*", "/a/*", True),
        ("/ab/*", "/a/*", False),
        ("*", "/a/*", False),
        ("/a/b/*", "/a/b", False),
        ("/anything", "*", True),
    ],
)
def test_path_within(child: str, parent: str, expected: bool) -> None:
    assert path_within(child, parent) is expected
