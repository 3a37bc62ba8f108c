"""Fail closed when the revocation feed is stale: which tasks are denied, from when, and until when."""

from __future__ import annotations

import time
from pathlib import Path

from sidecar.authority.client import FeedStatus
from sidecar.config.schema import TaskSpec
from sidecar.decision import Reason
from sidecar.identity.devca import DevCA
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.model import task_state
from tests.support.config import task
from tests.support.grant_chain import Chain, root_task
from tests.support.runtime import Clock, make_runtime, req

TD = "unit.example"
ORCH, SUB = f"spiffe://{TD}/ns/agents/sa/orchestrator", f"spiffe://{TD}/ns/agents/sa/sub"


def test_the_feed_is_stale_after_max_staleness_without_contact_counted_from_start() -> None:
    status = FeedStatus(max_staleness=30, applies_to="delegated", started_at=1000.0)
    assert not status.stale(1030.0) and status.stale(1030.5)  # never connected: from start
    status.last_contact = 1100.0
    assert status.stale_scope(1129.0) is None and status.stale_scope(1130.5) == "delegated"
    status.applies_to = "all"
    assert status.stale_scope(1200.0) == "all"


def test_only_delegated_grants_are_denied_unless_every_task_is_asked_for() -> None:
    chain = Chain(DevCA.create(TD))
    root = chain.root(root_task("q3", ORCH))
    delegated = chain.grant(chain.delegate(root, SUB, "market"))
    held_root = chain.grant(chain.root(root_task("own", SUB)))
    now = time.time()
    index = compile_policy(
        [
            TaskSource(delegated.spec, grant=delegated),
            TaskSource(held_root.spec, grant=held_root),
            TaskSource(TaskSpec.model_validate(task("config-task", agent=SUB))),
        ],
        lambda _: now,
        SUB,
    )
    child, own, configured = (index.tasks_by_id[i] for i in ("q3/market", "own", "config-task"))
    assert [task_state(t, now) for t in (child, own, configured)] == [None, None, None]
    assert [task_state(t, now, "delegated") for t in (child, own, configured)] == [
        Reason.REVOCATION_FEED_STALE,
        None,
        None,
    ]
    assert {task_state(t, now, "all") for t in (child, own, configured)} == {Reason.REVOCATION_FEED_STALE}
    # revoked and expired stay what they are: the feed's state never hides a revocation
    assert task_state(child, delegated.expires_at + 1, "all") is Reason.TASK_EXPIRED


def test_the_runtime_denies_503_while_stale_and_allows_again_after_contact(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task("t1")], clock=clock)
    status = FeedStatus(max_staleness=30, applies_to="all", started_at=clock.now)
    runtime.feed = status
    assert runtime.decide(req(), "d1").allow
    clock.now += 31
    stale = runtime.decide(req(), "d2")
    assert (stale.allow, stale.reason, stale.http_status, stale.task_id) == (
        False,
        Reason.REVOCATION_FEED_STALE,
        503,
        "t1",
    )
    status.last_contact = clock.now
    assert runtime.decide(req(), "d3").allow
