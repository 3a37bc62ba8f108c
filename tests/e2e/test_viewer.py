"""The decision viewer in real headless Chromium, fed by real requests through real Envoy."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit.log import DecisionLog
from sidecar.harness import SidecarProcess, wait_until
from tests.support.config import AGENT, API_HOST, task, write_config
from tests.support.grants_env import DELEGATION, ORCH, OTHER, SUB, Scenario, api, check
from tests.support.grants_env import reason as reason_of
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
BARS = "[...document.querySelectorAll('#chart .bar')].map(b => [+b.dataset.allowed, +b.dataset.denied])"
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

    # The agent column: the distinguishing end of the SPIFFE ID (two trust domains are known here:
    # the intruder's caller ID is from elsewhere.example), the full ID on hover.
    agent_cell = page.locator(f'#records tr[data-id="{live.decision_id}"] td.c-agent')
    expect(agent_cell).to_have_text("test.example …/worker")
    assert agent_cell.get_attribute("title") == AGENT

    # Allow/deny over time: the chart counts what the table lists.
    expect(page.locator("#chart")).to_have_attribute("data-allowed", "4")
    expect(page.locator("#chart")).to_have_attribute("data-denied", "0")
    bars = page.evaluate(BARS)
    assert sum(a for a, _ in bars) == 4 and sum(d for _, d in bars) == 0 and len(bars) >= 2  # an hour apart

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


# --- delegation trees ------------------------------------------------------------------------------
DEMO = [sys.executable, "-m", "sidecar", "demo"]
Q3 = "q3-risk-report"
Q3_AGENTS = {
    "orchestrator": "spiffe://demo.agent-authz.local/ns/finance/sa/orchestrator",
    "market-data": "spiffe://demo.agent-authz.local/ns/finance/sa/market-data",
    "sales-data": "spiffe://demo.agent-authz.local/ns/finance/sa/sales-data",
    "filings": "spiffe://demo.agent-authz.local/ns/finance/sa/competitor-filings",
}


def _egress_counts(log: Path, task_id: str) -> tuple[int, int]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [r for r in records if r["task_id"] == task_id and r["direction"] == "egress"]
    return sum(r["decision"] == "allow" for r in mine), sum(r["decision"] != "allow" for r in mine)


def _node(page: Any, task_id: str) -> Any:
    return page.locator(f'#trees .node[data-task="{task_id}"]')


def test_the_quarterly_report_tree_in_the_orchestrators_viewer(tmp_path: Path, browser: Any) -> None:
    """`agent-authz demo --scenario quarterly-report --keep-running`: the URL it prints shows the tree."""
    expect = playwright_api.expect
    state = tmp_path / "q3"
    demo = subprocess.Popen(
        [*DEMO, "--scenario", "quarterly-report", "--keep-running", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()], daemon=True)
    reader.start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not output or not output[-1].strip().startswith("The same in a terminal: "):
            output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        (url,) = [line.split("Decision viewer: ", 1)[1].strip() for line in output if "Decision viewer: " in line]
        text = "".join(output)
        assert "All 35 outcomes match" in text and "The same in a terminal: agent-authz logs " in text, text

        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url)
        tree = page.locator(f'#trees figure.tree[data-txn="{Q3}"]')
        expect(tree.locator(".node")).to_have_count(4)
        expect(tree.locator("figcaption")).to_contain_text("4 grants")
        # the root: the orchestrator's task, revoked by the admin at the end; 30 calls reserved for
        # the three sub-grants; what the orchestrator spent itself from its budget ledger
        root = _node(page, Q3)
        orch_allowed, orch_denied = _egress_counts(state / "orchestrator" / "decisions.log", Q3)
        for name, value in {"state": "revoked", "parent": "", "max": "100", "reserved": "30", "used": str(orch_allowed),
                            "allowed": str(orch_allowed), "denied": str(orch_denied),
                            "agent": Q3_AGENTS["orchestrator"]}.items():  # fmt: skip
            expect(root).to_have_attribute(f"data-{name}", value)
        expect(root.locator("text.agent")).to_have_text("…/orchestrator")
        # the sub-grants: what each sub-agent spent is known from its own log (viewer.logs)
        for name in ("market-data", "sales-data", "filings"):
            node = _node(page, f"{Q3}/{name}")
            allowed, denied = _egress_counts(state / name / "decisions.log", f"{Q3}/{name}")
            assert allowed >= 1 and denied >= 1
            for attribute, value in {"state": "revoked", "parent": Q3, "max": "10", "reserved": "0",
                                     "used": str(allowed), "allowed": str(allowed), "denied": str(denied),
                                     "agent": Q3_AGENTS[name]}.items():  # fmt: skip
                expect(node).to_have_attribute(f"data-{attribute}", value)
            expect(node.locator("text.name")).to_have_text(name)
            expect(node.locator("text.budget")).to_have_text(f"{allowed} / 10 used")
        expect(_node(page, f"{Q3}/filings").locator("text.agent")).to_have_text("…/competitor-filings")
        assert page.locator("#trees path.edge").count() == 3

        # the chart and the table: every record of the four logs
        records = [
            json.loads(line) for name in Q3_AGENTS for line in (state / name / "decisions.log").read_text().splitlines()
        ]
        allowed_total = sum(r["decision"] == "allow" for r in records)
        expect(page.locator("#records tbody tr.record")).to_have_count(len(records))
        expect(page.locator("#chart")).to_have_attribute("data-allowed", str(allowed_total))
        expect(page.locator("#chart")).to_have_attribute("data-denied", str(len(records) - allowed_total))
        cell = page.locator(f'#records tbody tr[data-task="{Q3}/market-data"] td.c-agent').first
        expect(cell).to_have_text("…/market-data")
        assert cell.get_attribute("title") == Q3_AGENTS["market-data"]
        assert not problems, problems
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
        reader.join(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()
    assert demo.returncode == 0, "".join(output)
    assert str(state) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


HOSTILE_TASK = "q3/<img src=x onerror=window.__pwned='task'>"
HOSTILE_AGENT = "spiffe://test.example/ns/finance/sa/\"><svg onload=window.__pwned='agent'>"
HOSTILE_TXN = "<script>window.__pwned='txn'</script>"
HOSTILE_PURPOSE = "<b onmouseover=\"window.__pwned='purpose'\">Pull prices</b>"


def _hostile_log(path: Path) -> None:
    """Another "sidecar's" log as an attacker would write it: markup in every string, junk lines."""
    now = _iso(time.time())
    base = {"event": "decision", "direction": "egress", "time": now, "method": "GET", "status": 200}
    h1 = {"decision_id": "h1", "task_id": HOSTILE_TASK, "txn": "q3", "agent": HOSTILE_AGENT, "decision": "allow"}
    h1 |= {"reason": "allowed", "host": "<i>h</i>.internal", "path": "/<script>window.__pwned='path'</script>"}
    h2 = {"decision_id": "h2", "task_id": HOSTILE_TXN, "txn": HOSTILE_TXN, "decision": "deny", "status": 403}
    h2 |= {"agent": "<img src=x onerror=window.__pwned='agent2'>", "reason": "task_revoked"}
    h3 = {"decision_id": "h3", "task_id": 5, "txn": {"a": 1}, "host": {"x": 1}, "decision": "allow"}
    lines = [json.dumps(base | h1), json.dumps(base | h2), "not json at all", "[1, 2, 3]", json.dumps(base | h3)]
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")


def test_the_tree_follows_delegation_and_revocation_live_and_shows_hostile_strings_as_text(
    tmp_path: Path, short_dir: Path, browser: Any
) -> None:
    expect = playwright_api.expect
    sc = Scenario(tmp_path)
    hostile = tmp_path / "elsewhere" / "decisions.log"
    _hostile_log(hostile)
    dirs = {name: short_dir / name for name in ("o", "m", "s")}
    for directory in dirs.values():
        directory.mkdir()
    orch_cfg = sc.agent_config("orch", ORCH, dirs["o"], grants=[sc.root_grant()], publish=True)
    config = yaml.safe_load(orch_cfg.read_text())
    logs = [tmp_path / "market" / "decisions.log", tmp_path / "sales" / "decisions.log", hostile]
    config["viewer"] = {"logs": [str(p) for p in [*logs, tmp_path / "missing" / "decisions.log"]]}
    write_config(tmp_path / "orch", config)
    published = [tmp_path / "orch" / "revocations.jwt"]
    market_cfg = sc.agent_config("market", SUB, dirs["m"], revocations=published)
    sales_cfg = sc.agent_config("sales", OTHER, dirs["s"], revocations=published)
    procs = [SidecarProcess(cfg, log_dir=cfg.parent) for cfg in (orch_cfg, market_cfg, sales_cfg)]
    orch, market, sales = procs
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready()
        page = browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(orch.admin_url + "/decisions")
        q3 = page.locator('#trees figure.tree[data-txn="q3"]')
        expect(q3.locator(".node")).to_have_count(2)  # the root, and the hostile log's record under it
        expect(_node(page, "q3")).to_have_attribute("data-state", "allowed")
        expect(_node(page, "q3")).to_have_attribute("data-reserved", "0")
        page.evaluate("window.__marker = 'same page'")

        # delegation appears without a reload: two sub-grants, their budgets reserved from the root
        status, issued = api(orch, "POST", "/v1/tasks/q3/delegate", DELEGATION | {"purpose": HOSTILE_PURPOSE})
        assert status == 201, issued
        sales_grant = {
            "subject": OTHER,
            "ttl": "10m",
            "name": "sales",
            "max_calls": 3,
            "egress": [{"host": "sales.internal", "methods": ["GET"], "paths": ["/v1/sales/q3/*"]}],
        }
        status, issued_sales = api(orch, "POST", "/v1/tasks/q3/delegate", sales_grant)
        assert status == 201, issued_sales
        expect(q3.locator(".node")).to_have_count(4, timeout=10_000)
        expect(_node(page, "q3")).to_have_attribute("data-reserved", "8")
        for task_id, agent, max_calls in (("q3/market", SUB, "5"), ("q3/sales", OTHER, "3")):
            node = _node(page, task_id)
            expected = {"state": "allowed", "parent": "q3", "agent": agent, "max": max_calls, "used": ""}
            for name, value in expected.items():
                expect(node).to_have_attribute(f"data-{name}", value)  # used: not known before any record
        assert api(market, "POST", "/v1/tasks", issued["grant"])[0] == 201
        assert api(sales, "POST", "/v1/tasks", issued_sales["grant"])[0] == 201

        # the sub-agents' calls, decided by their own sidecars, counted from their logs
        market_sock, sales_sock = dirs["m"] / "authz.sock", dirs["s"] / "authz.sock"
        assert reason_of(check(market_sock, "market.internal", "/v1/prices/ACME/1")) == "allowed"
        assert reason_of(check(market_sock, "market.internal", "/v1/prices/ACME/2")) == "allowed"
        assert reason_of(check(market_sock, "market.internal", "/v1/prices/GLOBEX/1")) == "path_not_allowed"
        assert reason_of(check(sales_sock, "sales.internal", "/v1/sales/q3/sum")) == "allowed"
        market_node, sales_node = _node(page, "q3/market"), _node(page, "q3/sales")
        for node, used, denied in ((market_node, "2", "1"), (sales_node, "1", "0")):
            expect(node).to_have_attribute("data-used", used, timeout=10_000)
            expect(node).to_have_attribute("data-denied", denied)
        expect(market_node.locator("text.budget")).to_have_text("2 / 5 used")

        # a sub-grant revoked: the node turns revoked in place, the next call is denied and counted
        assert api(orch, "POST", "/v1/tasks/q3/sales/revoke")[0] == 200
        expect(sales_node).to_have_attribute("data-state", "revoked", timeout=10_000)
        expect(market_node).to_have_attribute("data-state", "allowed")
        wait_until(
            lambda: reason_of(check(sales_sock, "sales.internal", "/v1/sales/q3/sum")) == "task_revoked",
            timeout=10,
            what="the revocation reaches the sales agent's sidecar",
        )
        expect(sales_node).to_have_attribute("data-denied", "1", timeout=10_000)
        assert page.evaluate("window.__marker") == "same page"

        # hostile strings are text: the node under q3, a tree of its own, the records, the tooltips
        shown = page.evaluate(
            """() => [...document.querySelectorAll('#trees .node')].map(n => ({
                task: n.dataset.task, name: n.querySelector('text.name').textContent,
                agent: n.dataset.agent, title: n.querySelector('title').textContent}))"""
        )
        by_task = {n["task"]: n for n in shown}
        assert by_task[HOSTILE_TASK]["name"] == HOSTILE_TASK.removeprefix("q3/")
        assert by_task[HOSTILE_TASK]["agent"] == HOSTILE_AGENT
        assert HOSTILE_PURPOSE in by_task["q3/market"]["title"]
        caption = page.locator(f'#trees figure.tree[data-txn="{HOSTILE_TXN}"] figcaption strong')
        expect(caption).to_have_text(HOSTILE_TXN)
        expect(page.locator('#records tr[data-id="h1"] td.c-request')).to_contain_text("<script>window.__pwned='path'")
        expect(page.locator('#records tr[data-id="h3"] td.c-task')).to_have_text("5")
        assert page.evaluate("window.__pwned") is None
        injected = page.evaluate("document.querySelectorAll('img, b, i, [onerror], [onload], [onmouseover]').length")
        assert injected == 0 and page.locator("script").count() == 1
        sources = page.locator("#tree-sources")
        expect(sources).to_contain_text(str(hostile))
        expect(sources).to_contain_text("missing/decisions.log – not there (yet)")

        # the chart counts what the table lists
        rows = page.locator("#records tbody tr.record")
        allowed = page.locator('#records tbody tr.record[data-decision="allow"]').count()
        expect(page.locator("#chart")).to_have_attribute("data-allowed", str(allowed))
        expect(page.locator("#chart")).to_have_attribute("data-denied", str(rows.count() - allowed))
        assert allowed == 5  # 2 market + 1 sales here, h1 and h3 from the hostile log
        assert not problems, problems
    finally:
        for proc in procs:
            proc.stop()


def test_the_approve_button_is_for_an_operator_only(
    env_factory: Callable[..., Env], tmp_path: Path, browser: Any
) -> None:
    """A call waits for approval; the viewer shows it. Without a token there is no button; with a
    forged one the sidecar refuses; with the operator's token (``agent-authz approve --operator-token``,
    opened as the URL it prints) the button approves it, and the agent's retry passes once."""
    expect = playwright_api.expect
    scenario = Scenario(tmp_path)
    rule = {"name": "delete", "host": API_HOST, "methods": ["DELETE"], "paths": ["/v1/items/*"], "approval": "required",
            "audience": "https://api.internal"}  # fmt: skip

    def mutate(config: dict[str, Any], _: int) -> None:
        config["grants"] = {"root_issuers": [{"jwks": str(tmp_path / "issuer" / "issuer.jwks.json")}]}

    env = env_factory([task("t1", egress=[rule])], mutate=mutate)
    waiting = env.send("DELETE", f"http://{API_HOST}/v1/items/3")
    approval_id = waiting.json()["approval_id"]
    problems: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(env.admin + "/decisions")
    row = page.locator(f'#approval-list tr[data-approval="{approval_id}"]')
    expect(row.locator("td.a-status")).to_have_text("pending")
    expect(row.locator("td.a-call")).to_have_text(f"DELETE {API_HOST}/v1/items/3")
    expect(row.locator("button.a-approve")).to_have_count(0)  # not signed in: nothing to click
    expect(page.locator("#operator")).to_have_text("viewer only")

    # a token the agent could make (its own key) is refused by the sidecar, and recorded
    from cryptography.hazmat.primitives.asymmetric import ec

    from sidecar.control.documents import sign_operator_token

    forged = sign_operator_token(
        ec.generate_private_key(ec.SECP256R1()), issuer="x", audience=AGENT, now=time.time(), lifetime=60, kid="x"
    )
    page.fill("#operator-token", forged)
    page.click("#operator-form button[type=submit]")
    expect(page.locator("#operator")).to_have_text("operator: may approve")
    row.locator("button.a-approve").click()
    expect(row.locator(".a-error")).to_contain_text("control_untrusted_signer")
    # the refusal is recorded; its record reaches the page live and reloads the approvals: the
    # message stays on the row (it used to vanish 200 ms later, so the operator might never see it)
    expect(page.locator("#records tbody tr", has_text="not_authorized").first).to_be_visible()
    page.wait_for_timeout(500)  # past the reload the record schedules
    expect(row.locator(".a-error")).to_contain_text("control_untrusted_signer")
    assert env.send("DELETE", f"http://{API_HOST}/v1/items/3").reason == "approval_required"
    page.click("#operator-out")

    token = subprocess.run(
        [*DEMO[:-1], "approve", "--operator-token", "--key", str(scenario.root / "issuer" / "issuer.key"),
         "--admin", env.admin, "--ttl", "10m"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (link,) = [line.split("viewer: ", 1)[1] for line in token.stderr.splitlines() if line.startswith("viewer: ")]
    page.goto(link)
    expect(page.locator("#operator")).to_have_text("operator: may approve")
    assert "#operator" not in page.url  # taken into sessionStorage, out of the address bar
    row.locator("select.a-ttl").select_option("5m")
    row.locator("button.a-approve").click()
    expect(row.locator("td.a-status")).to_have_text("approved")
    expect(row.locator("td.a-action")).to_contain_text("by key:")
    retry = env.send("DELETE", f"http://{API_HOST}/v1/items/3")
    assert retry.status == 200 and env.record(retry.decision_id)["approval"]["id"] == approval_id
    expect(row.locator("td.a-status")).to_have_text("consumed")  # live: the record updates the panel
    refused = [r for r in env.records() if r["direction"] == "control" and r["reason"] == "not_authorized"]
    granted = [r for r in env.records() if r["reason"] == "approval_granted"]
    assert len(refused) == 1 and len(granted) == 1 and granted[0]["approval"]["expires_at"] - time.time() < 301
    assert not problems, problems
