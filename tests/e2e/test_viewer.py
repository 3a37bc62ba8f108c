"""The decision viewer in real headless Chromium, fed by real requests through real Envoy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.log import DecisionLog
from tests.support.config import AGENT, API_HOST, task
from tests.support.stack import Env

pytestmark = pytest.mark.e2e

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCHEDULER = "spiffe://test.example/ns/ops/sa/scheduler"
INTRUDER = "spiffe://elsewhere.example/ns/x/sa/intruder"
ORCHESTRATOR = "spiffe://test.example/ns/agents/sa/orchestrator"
TASKS = [
    task("t1", max_calls=20),
    task("t2", egress=[{"name": "spend", "host": "other.internal", "methods": ["POST"], "paths": ["/v1/spend"]}]),
]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seed(path: Path) -> None:
    """Ingress records an earlier process wrote (an hour ago), with a caller and a delegation chain."""
    log = DecisionLog(path, stdout=False)
    an_hour_ago = time.time() - 3600
    for i, (caller, decision, reason) in enumerate(
        [(SCHEDULER, "allow", "allowed"), (INTRUDER, "deny", "task_not_for_agent")]
    ):
        log.append(
            {
                "time": _iso(an_hour_ago + i),
                "decision_id": f"seeded{i}",
                "request_id": f"r{i}",
                "direction": "ingress",
                "agent": AGENT,
                "caller": caller,
                "task_id": "t1",
                "method": "POST",
                "host": "worker.internal",
                "port": 8080,
                "path": "/tasks/run",
                "decision": decision,
                "reason": reason,
                "status": 200 if decision == "allow" else 403,
                "act": {"sub": AGENT, "act": {"sub": ORCHESTRATOR}},
                "token": None,
                "latency_us": 10,
                "event": "decision",
            }
        )
    log.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_viewer_filters_live_updates_detail_summary_and_chain(
    env_factory: Callable[..., Env], tmp_path: Path, browser: Any
) -> None:
    expect = playwright_api.expect
    env = env_factory(TASKS, mutate=lambda _c, _p: _seed(tmp_path / "decisions.log"))
    allowed = env.send("GET", f"http://{API_HOST}/v1/items/1", {"x-agent-task": "t1"})
    denied = env.send("GET", f"http://{API_HOST}/v1/nope", {"x-agent-task": "t1"})
    spent = env.send("POST", "http://other.internal/v1/spend", body=b"{}")
    assert (allowed.status, denied.status, spent.status) == (200, 403, 200)

    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(env.admin + "/decisions")
    rows = page.locator("#records tbody tr.record")
    expect(rows).to_have_count(5)
    assert rows.first.get_attribute("data-id") == spent.decision_id  # newest first
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(page.locator("#chain-status")).to_have_attribute("data-status", "intact", timeout=20_000)
    expect(page.locator("#chain-status")).to_contain_text("5 records")

    # Filters, one at a time; each step waits until the table shows that filter's answer.
    def shows(ids: list[str], **filters: str) -> None:
        for name in ("task", "agent", "caller", "since", "until"):
            page.fill(f"#f-{name}", filters.get(name, ""))
        for name in ("decision", "reason"):
            page.select_option(f"#f-{name}", filters.get(name, ""))
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        expect(page.locator("#records tbody")).to_have_attribute(
            "data-query", query.replace(":", "%3A").replace("/", "%2F")
        )
        expect(rows).to_have_count(len(ids))
        assert [rows.nth(i).get_attribute("data-id") for i in range(len(ids))] == ids

    shows([denied.decision_id, "seeded1"], decision="deny")
    shows([denied.decision_id], reason="path_not_allowed")
    shows([spent.decision_id], task="t2")
    shows(["seeded0"], caller=SCHEDULER)
    shows([], agent="spiffe://test.example/ns/agents/sa/nobody")
    shows([spent.decision_id, denied.decision_id, allowed.decision_id], agent=AGENT, since="30m")
    until = _iso(time.time() - 1800)
    shows(["seeded1", "seeded0"], until=until)
    shows([spent.decision_id, denied.decision_id, allowed.decision_id, "seeded1", "seeded0"])

    # Live: with the filter "allow", a new allowed call appears without a reload; a new deny does not.
    shows([spent.decision_id, allowed.decision_id, "seeded0"], decision="allow")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    page.evaluate("window.__marker = 'same page'")
    live_deny = env.send("GET", f"http://{API_HOST}/v1/also-nope", {"x-agent-task": "t1"})
    live = env.send("GET", f"http://{API_HOST}/v1/items/live", {"x-agent-task": "t1"})
    assert (live.status, live_deny.status) == (200, 403)
    expect(page.locator(f'#records tr[data-id="{live.decision_id}"]')).to_have_count(1)
    expect(rows).to_have_count(4)
    assert rows.first.get_attribute("data-id") == live.decision_id
    assert page.locator(f'#records tr[data-id="{live_deny.decision_id}"]').count() == 0
    assert page.evaluate("window.__marker") == "same page"

    # Detail: all fields, the token's jti/aud/exp.
    page.locator(f'#records tr[data-id="{live.decision_id}"]').click()
    record = env.record(live.decision_id)
    expect(page.locator("#detail-id")).to_have_text(live.decision_id)
    expect(page.locator("#detail-token-fields .t-jti")).to_have_text(record["token"]["jti"])
    expect(page.locator("#detail-token-fields .t-aud")).to_have_text("https://api.internal")
    expect(page.locator("#detail-token-fields .t-exp")).to_contain_text(str(record["token"]["exp"]))
    for field in ("path", "rule", "hash", "prev_hash", "seq"):
        expect(page.locator(f'#detail-fields tr[data-field="{field}"] td').nth(1)).to_have_text(str(record[field]))

    # Detail of a record with a delegation chain (current actor first).
    page.select_option("#f-decision", "")
    page.locator('#records tr[data-id="seeded0"]').click()
    expect(page.locator("#detail-act li")).to_have_count(2)
    expect(page.locator("#detail-act li").first).to_contain_text(AGENT)
    expect(page.locator("#detail-act li").nth(1)).to_have_text(ORCHESTRATOR)

    # Per-task summary: calls by destination and the budget as enforced.
    t1 = page.locator('.task[data-task="t1"]')
    expect(t1.locator(".s-budget")).to_contain_text("2 / 20")
    expect(t1.locator('tr[data-destination="api.internal"] td').nth(1)).to_have_text("2")
    expect(t1.locator('tr[data-destination="api.internal"] td').nth(2)).to_have_text("2")
    expect(t1.locator('tr[data-destination="worker.internal:8080"] td').nth(2)).to_have_text("1")
    expect(page.locator('.task[data-task="t2"] .s-allowed')).to_have_text("1 allowed")
    assert not problems, problems
