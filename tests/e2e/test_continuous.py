"""Continuous verification through real Envoy and real sidecar processes: the anomaly rule
(quarantine), the freeze/unfreeze/kill ladder across sidecars, single-use human approvals bound to
the exact call, sensitivity labels, budgets that say what is left - and the agent's UID trying to
approve, unfreeze or kill for itself.

The operator acts through the real ``agent-authz`` CLI with the root issuer key (``task freeze``,
``task unfreeze``, ``task kill``, ``approve``); the agent's calls go through Envoy's egress listener.
Run on its own: ``pytest tests/e2e/test_continuous.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.demo.agent_servers import CALLS, ServerThread, warehouse_app
from sidecar.demo.upstream import SampleUpstream, TokenCheck
from sidecar.harness import AuthzStack, SidecarProcess, wait_until
from sidecar.simulation.netns import AGENT_UID, as_user
from tests.support.agent_protocols import MCP_HOST
from tests.support.config import API_AUDIENCE, API_HOST, ISSUER, task, write_config
from tests.support.continuous import Operator, call_admin
from tests.support.grants_env import DELEGATION, ORCH, SUB, Scenario, check, dump, reason
from tests.support.stack import Env, Reply, metric, send

pytestmark = pytest.mark.e2e

ITEMS = f"http://{API_HOST}/v1/items"
READ = {
    "name": "read",
    "host": API_HOST,
    "methods": ["GET"],
    "paths": ["/v1/items/*"],
    "audience": API_AUDIENCE,
    "scope": "items:read",
}
DELETE = {
    "name": "delete",
    "host": API_HOST,
    "methods": ["DELETE"],
    "paths": ["/v1/items/*"],
    "audience": API_AUDIENCE,
    "approval": "required",
}
JSON_RPC = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path)


@pytest.fixture
def operator(scenario: Scenario) -> Operator:
    return Operator(scenario.root)


def controls(scenario: Scenario, **sections: Any) -> Callable[[dict[str, Any], int], None]:
    """A ``mutate`` for :func:`~tests.support.stack.start_env`: the root issuer, the operator's
    actions file, a durable state, and the given sections."""

    def mutate(config: dict[str, Any], _: int) -> None:
        config["grants"] = {"root_issuers": [{"jwks": str(scenario.root / "issuer" / "issuer.jwks.json")}]}
        config["ladder"] = {"files": [str(scenario.root / "issuer" / "actions.jwt")]}
        config["state"] = {"path": "state/state.db"}
        for key, value in sections.items():
            config.setdefault(key, {}).update(value)

    return mutate


def control_records(env_or_path: Env | Path, reason_code: str | None = None) -> list[dict[str, Any]]:
    path = env_or_path.state / "decisions.log" if isinstance(env_or_path, Env) else env_or_path
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["direction"] == "control" and reason_code in (None, r["reason"])]


def wait_reason(do: Callable[[], Reply], expected: str, what: str) -> Reply:
    """Repeat a call until it is answered with ``expected`` (a file the sidecar watches changed)."""
    seen: list[Reply] = []

    def probe() -> Reply | None:
        reply = do()
        seen[:] = [reply]
        verdict = reply.reason or ("allowed" if reply.decision_id else None)  # a 503: the sidecar is not back yet
        return reply if verdict == expected else None

    try:
        return wait_until(probe, timeout=10, what=what, interval=0.05)
    except TimeoutError as exc:
        last = seen[0] if seen else None
        raise AssertionError(f"{what}: last answer {last and (last.status, last.reason, last.body[:300])}") from exc


# -- the anomaly rule ------------------------------------------------------------------------------------
def test_quarantine_threshold_and_window(env_factory: Callable[..., Env], scenario: Scenario, tmp_path: Path) -> None:
    limited = {**READ, "name": "limited", "methods": ["POST"], "max_calls": 2}
    env = env_factory(
        [task("t1", egress=[READ, limited])],
        mutate=controls(scenario, quarantine={"threshold": 3, "window": "1500ms"}),
    )
    assert env.send("GET", f"{ITEMS}/1").status == 200
    # budgets answer what is left, and exhausting one never counts as probing
    first = env.send("POST", f"{ITEMS}/1", body=b"{}")
    assert first.status == 200 and first.headers["x-agent-authz-remaining"] == "1"
    assert env.record(first.decision_id)["remaining"] == 1
    assert env.send("POST", f"{ITEMS}/1", body=b"{}").headers["x-agent-authz-remaining"] == "0"
    for _ in range(4):
        spent = env.send("POST", f"{ITEMS}/1", body=b"{}")
        assert (spent.status, spent.reason) == (429, "budget_exhausted")
        assert spent.json() == {"decision_id": spent.decision_id, "reason": "budget_exhausted", "remaining": 0}
        assert env.record(spent.decision_id)["remaining"] == 0
    assert env.send("GET", f"{ITEMS}/2").status == 200

    # two probes, then the window passes: they no longer count
    early = [env.send("GET", f"http://{API_HOST}/v1/admin/users"), env.send("GET", "http://other.internal/")]
    assert [r.reason for r in early] == ["path_not_allowed", "host_not_allowed"]
    time.sleep(1.6)
    probes = [env.send("GET", f"http://{API_HOST}/v1/admin/users"), env.send("DELETE", f"{ITEMS}/1")]
    assert [r.reason for r in probes] == ["path_not_allowed", "method_not_allowed"]
    assert env.send("GET", f"{ITEMS}/3").status == 200, "two probes within the window: not frozen yet"
    assert not control_records(env)
    probes.append(env.send("PUT", f"{ITEMS}/1", body=b"{}"))  # the third within 1.5 s
    assert probes[-1].reason == "method_not_allowed"

    frozen = env.send("GET", f"{ITEMS}/4")
    assert (frozen.status, frozen.reason) == (403, "task_quarantined")
    assert env.upstream.requests()[-1].raw_path == "/v1/items/3"  # nothing after the freeze reached it
    (freeze,) = control_records(env, "task_frozen")
    assert freeze["action"]["evidence"] == [r.decision_id for r in probes]
    assert freeze["action"]["target"] == "subtree:t1" and freeze["action"]["kind"] == "freeze"
    assert freeze["task_id"] == "t1" and freeze["decision"] == "allow"
    tripping = env.record(probes[-1].decision_id)
    assert freeze["seq"] == tripping["seq"] + 1, "the freeze is recorded right after the call that tripped it"
    record = env.record(frozen.decision_id)
    assert "frozen by the anomaly rule" in record["detail"] and freeze["action"]["action_id"] in record["detail"]
    assert metric(env, "agent_authz_quarantines_total", mode="freeze") == 1
    assert metric(env, "agent_authz_blocked_tasks", reason="task_quarantined") == 1
    assert metric(env, "agent_authz_control_records_total", reason="task_frozen") == 1
    # frozen calls never count again, and the freeze survives a restart of the sidecar (kill -9)
    assert env.send("GET", "http://other.internal/").reason == "task_quarantined"
    proc = env.stack.sidecar.proc
    assert proc is not None
    proc.kill()
    proc.wait(10)
    env.stack.sidecar.start()
    env.stack.sidecar.wait_ready()
    again = wait_reason(lambda: env.send("GET", f"{ITEMS}/5"), "task_quarantined", "the sidecar is back")
    assert again.status == 403
    assert len(control_records(env, "task_frozen")) == 1


# -- the ladder across sidecars ---------------------------------------------------------------------------
@pytest.fixture
def delegation(
    scenario: Scenario, short_dir: Path, tmp_path: Path
) -> Iterator[tuple[SidecarProcess, AuthzStack, SampleUpstream]]:
    """An orchestrator sidecar (root grant q3, quarantine threshold 2, publishing its actions) and a
    sub-agent's sidecar with Envoy, holding q3/market: both watch the operator's actions file, the
    sub-agent also the orchestrator's published one."""
    upstream = SampleUpstream({})
    port = upstream.start()
    orch_dir, sub_dir = short_dir / "o", short_dir / "s"
    orch_dir.mkdir()
    sub_dir.mkdir()
    issuer_actions = str(scenario.root / "issuer" / "actions.jwt")
    orch_actions = str(scenario.root / "orch" / "actions.jwt")
    orch_cfg = scenario.agent_config("orch", ORCH, orch_dir, grants=[scenario.root_grant()], publish=True)
    sub_cfg = scenario.agent_config("sub", SUB, sub_dir, revocations=[tmp_path / "orch" / "revocations.jwt"])
    for path, extra in (
        (orch_cfg, {"ladder": {"files": [issuer_actions], "publish": orch_actions}, "quarantine": {"threshold": 2}}),
        (sub_cfg, {"ladder": {"files": [issuer_actions, orch_actions]}}),
    ):
        config = dump(path)
        config.update(extra, state={"path": "state/state.db"})
        config["envoy"]["destinations"] = {"market.internal": f"127.0.0.1:{port}"}
        write_config(path.parent, config)
    orch = SidecarProcess(orch_cfg, log_dir=tmp_path / "orch")
    sub = AuthzStack(sub_cfg, tmp_path / "sub")
    try:
        orch.start()
        orch.wait_ready()
        sub.start()
        status, issued = call_admin(orch.admin_url, "POST", "/v1/tasks/q3/delegate", json.dumps(DELEGATION))
        assert status == 201, issued
        status, body = call_admin(sub.sidecar.admin_url, "POST", "/v1/tasks", issued["grant"])
        assert status == 201, body
        yield orch, sub, upstream
    finally:
        sub.stop()
        orch.stop()
        upstream.stop()


PRICES = "http://market.internal/v1/prices/ACME/today"


def test_freeze_of_a_subtree_and_unfreeze(
    delegation: tuple[SidecarProcess, AuthzStack, SampleUpstream], operator: Operator, short_dir: Path
) -> None:
    """The orchestrator's task starts probing and is quarantined: its whole delegation subtree is
    frozen - the sub-agent in its own sidecar too, through the orchestrator's published actions -
    until the operator unfreezes it."""
    orch, sub, _ = delegation
    orch_sock = short_dir / "o" / "authz.sock"

    def call() -> Reply:
        return send(sub.egress_port, "GET", PRICES)

    assert call().status == 200
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "allowed"
    # the orchestrator (hijacked) probes: two out-of-task calls freeze subtree:q3
    assert reason(check(orch_sock, "evil.example.com", "/exfiltrate")) == "host_not_allowed"
    assert reason(check(orch_sock, "market.internal", "/v1/admin")) == "path_not_allowed"
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "task_quarantined"
    published = (Path(orch.log_dir) / "actions.jwt").read_text().split()
    assert len(published) == 1 and jwt.get_unverified_header(published[0])["typ"] == "agent-authz-action+jwt"
    assert jwt.decode(published[0], options={"verify_signature": False})["target"] == "subtree:q3"
    denied = wait_reason(call, "task_quarantined", "the freeze reaches the sub-agent's sidecar")
    record = json.loads((Path(sub.work_dir) / "decisions.log").read_text().splitlines()[-1])
    assert record["decision_id"] == denied.decision_id and "subtree:q3" in record["detail"]
    assert record["task_id"] == "q3/market" and ORCH in record["detail"]
    (received,) = control_records(Path(sub.work_dir) / "decisions.log", "task_frozen")
    assert received["action"]["by"] == ORCH and received["action"]["source"].startswith("file:")
    _, tree = call_admin(orch.admin_url, "GET", "/decisions/api/tree")
    states = {n["task_id"]: n["state"] for t in tree["trees"] for n in t["nodes"]}
    assert states == {"q3": "frozen", "q3/market": "frozen"}

    # only a root issuer unfreezes; the operator does, in the file both sidecars watch
    operator.step("unfreeze", "subtree:q3", reason="investigated: a test")
    wait_reason(call, "allowed", "the unfreeze reaches the sub-agent")
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "allowed"
    assert len(control_records(Path(orch.log_dir) / "decisions.log", "task_unfrozen")) == 1
    # the strikes started over: one more probe does not freeze again
    assert reason(check(orch_sock, "evil.example.com", "/x")) == "host_not_allowed"
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "allowed"

    # an operator freeze of the sub-agent's task only (not its parent), posted to its sidecar
    operator.step("freeze", "task:q3/market", admin=sub.sidecar.admin_url, to_file=False)
    assert call().reason == "task_quarantined"
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "allowed"
    operator.step("unfreeze", "task:q3/market", admin=sub.sidecar.admin_url, to_file=False)
    assert call().status == 200


def test_kill_revokes_the_tree_and_refuses_new_grants_under_it(
    delegation: tuple[SidecarProcess, AuthzStack, SampleUpstream], operator: Operator, short_dir: Path
) -> None:
    orch, sub, _ = delegation
    orch_sock = short_dir / "o" / "authz.sock"
    late = {**DELEGATION, "name": "late", "max_calls": 1, "egress": [{**DELEGATION["egress"][0], "max_calls": 1}]}
    status, signed_before = call_admin(orch.admin_url, "POST", "/v1/tasks/q3/delegate", json.dumps(late))
    assert status == 201, signed_before  # issued before the kill, posted after it
    assert send(sub.egress_port, "GET", PRICES).status == 200
    out = operator.step("kill", "subtree:q3", admin=orch.admin_url, reason="compromised")
    assert "applied 1" in out
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "task_revoked"
    killed = wait_reason(lambda: send(sub.egress_port, "GET", PRICES), "task_revoked", "the kill reaches the sub-agent")
    assert killed.status == 403
    (record,) = control_records(Path(orch.log_dir) / "decisions.log", "task_killed")
    assert record["action"]["target"] == "subtree:q3" and record["action"]["reason"] == "compromised"
    # refused: a new delegation from the killed task, and a grant under it arriving at the sub-agent
    status, body = call_admin(orch.admin_url, "POST", "/v1/tasks/q3/delegate", json.dumps({**late, "name": "m3"}))
    assert status == 409 and body["error"] == "grant_not_delegable" and "killed" in body["detail"], body
    status, body = call_admin(sub.sidecar.admin_url, "POST", "/v1/tasks", signed_before["grant"])
    assert status == 400 and body["error"] == "grant_rejected" and "killed" in body["detail"], body
    # an unfreeze lifts freezes, never a kill
    operator.step("unfreeze", "subtree:q3", admin=orch.admin_url)
    assert reason(check(orch_sock, "market.internal", "/v1/prices/ACME")) == "task_revoked"
    assert send(sub.egress_port, "GET", PRICES).reason == "task_revoked"


# -- approvals ---------------------------------------------------------------------------------------------
@pytest.fixture
def approvals_env(env_factory: Callable[..., Env], scenario: Scenario) -> Callable[..., Env]:
    def make(rules: list[dict[str, Any]] | None = None, **sections: Any) -> Env:
        return env_factory([task("t1", egress=rules or [READ, DELETE])], mutate=controls(scenario, **sections))

    return make


def test_approval_happy_path_and_replay(approvals_env: Callable[..., Env], operator: Operator) -> None:
    env = approvals_env()
    first = env.send("DELETE", f"{ITEMS}/7")
    assert (first.status, first.reason) == (403, "approval_required")
    body = first.json()
    approval_id = body["approval_id"]
    assert set(body) == {"decision_id", "reason", "approval_id"}
    record = env.record(first.decision_id)
    assert record["approval"]["id"] == approval_id and record["approval"]["status"] == "pending"
    assert not any(r.method == "DELETE" for r in env.upstream.requests())
    # waiting: the same call again is the same approval
    assert env.send("DELETE", f"{ITEMS}/7").json()["approval_id"] == approval_id

    approved = operator.approve(approval_id, env.admin, ttl="10m")
    assert approved.returncode == 0, approved.stderr
    assert f"approved {approval_id} (DELETE {API_HOST}/v1/items/7)" in approved.stdout
    assert re.search(r" until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00: one retry", approved.stdout), approved.stdout
    (granted,) = control_records(env, "approval_granted")
    assert granted["approval"]["id"] == approval_id and granted["approval"]["approved_by"].startswith("key:")

    retry = env.send("DELETE", f"{ITEMS}/7")
    assert retry.status == 200
    used = env.record(retry.decision_id)["approval"]
    assert used["id"] == approval_id and used["status"] == "consumed" and used["used_by"] == retry.decision_id
    assert [r.method for r in env.upstream.requests()].count("DELETE") == 1

    replay = env.send("DELETE", f"{ITEMS}/7")
    assert (replay.status, replay.reason) == (403, "approval_replayed")
    assert replay.json()["approval_id"] != approval_id  # put up for approval again, on its own
    assert [r.method for r in env.upstream.requests()].count("DELETE") == 1
    # the approval itself cannot be granted twice
    again = operator.approve(approval_id, env.admin)
    assert again.returncode == 1 and "control_approval_closed" in again.stderr
    _, listing = call_admin(env.admin, "GET", "/v1/approvals")
    states = {a["id"]: a["status"] for a in listing["approvals"]}
    assert states[approval_id] == "consumed" and states[replay.json()["approval_id"]] == "pending"


def test_approval_binds_the_body(approvals_env: Callable[..., Env], operator: Operator) -> None:
    """A plain-HTTP host of an approval rule: Envoy buffers the body for the sidecar, the approval
    binds its digest."""
    post = {**DELETE, "name": "publish", "methods": ["POST"]}
    env = approvals_env([READ, post])
    report = b'{"report": "q3", "rows": 120}'
    first = env.send("POST", f"{ITEMS}/report", {"content-type": "application/json"}, report)
    assert first.reason == "approval_required"
    assert env.record(first.decision_id)["approval"]["status"] == "pending"
    assert operator.approve(first.json()["approval_id"], env.admin).returncode == 0
    changed = env.send("POST", f"{ITEMS}/report", {"content-type": "application/json"}, b'{"report": "q3", "rows": 0}')
    assert changed.reason == "approval_mismatch"
    exact = env.send("POST", f"{ITEMS}/report", {"content-type": "application/json"}, report)
    assert exact.status == 200 and env.record(exact.decision_id)["approval"]["id"] == first.json()["approval_id"]
    assert [r.method for r in env.upstream.requests()].count("POST") == 1
    too_big = env.send("POST", f"{ITEMS}/report", {"content-type": "application/json"}, b"x" * (64 * 1024 + 10))
    assert too_big.reason == "approval_body_unavailable"  # over the cap: the sidecar never saw all of it


def test_approval_binds_the_headers_an_upstream_acts_on(approvals_env: Callable[..., Env], operator: Operator) -> None:
    """The approved ``DELETE`` retried with ``X-HTTP-Method-Override: PURGE`` (a header many APIs act on) is
    another call: ``approval_mismatch``, nothing delivered; the same call with a new request id and trace
    context is the approved one."""
    env = approvals_env()
    first = env.send("DELETE", f"{ITEMS}/7", {"x-delete-mode": "soft"})
    assert first.reason == "approval_required"
    listing = first.json()["approval_id"]
    assert operator.approve(listing, env.admin).returncode == 0
    for forged in ({"x-delete-mode": "soft", "x-http-method-override": "PURGE"}, {"x-delete-mode": "recursive"}, {}):
        assert env.send("DELETE", f"{ITEMS}/7", forged).reason == "approval_mismatch", forged
    assert [r.method for r in env.upstream.requests()].count("DELETE") == 0
    volatile = {
        "x-delete-mode": "soft",
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        "x-request-id": "r2",
    }
    exact = env.send("DELETE", f"{ITEMS}/7", volatile)
    assert exact.status == 200 and env.record(exact.decision_id)["approval"]["id"] == listing
    (delivered,) = [r.headers for r in env.upstream.requests() if r.method == "DELETE"]
    assert delivered["x-delete-mode"] == "soft" and "x-http-method-override" not in delivered


@pytest.fixture(scope="module")
def warehouse() -> Iterator[int]:
    server = ServerThread(warehouse_app([MCP_HOST]))
    try:
        yield server.start()
    finally:
        server.stop()


def tools_call(env: Env, name: str, arguments: dict[str, Any], rid: int = 1) -> Reply:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    body = {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": name, "arguments": {**arguments}, "_meta": meta},
    }
    headers = {**JSON_RPC, "mcp-method": "tools/call", "mcp-name": name, "mcp-protocol-version": "2026-07-28"}
    return env.send("POST", f"http://{MCP_HOST}/mcp", headers, json.dumps(body).encode())


def test_approval_binds_the_tool_arguments(
    env_factory: Callable[..., Env], scenario: Scenario, operator: Operator, warehouse: int
) -> None:
    """An MCP ``drop_table`` waits for a human; the approval binds its arguments' digest: the call
    with other arguments is ``approval_mismatch``, the approved one runs once."""
    rule = {
        "name": "warehouse",
        "host": MCP_HOST,
        "protocol": "mcp",
        "paths": ["/mcp"],
        "tools": ["list_tables", "drop_table"],
        "approval": {"tools": ["drop_*"]},
    }

    def mutate(config: dict[str, Any], port: int) -> None:
        controls(scenario)(config, port)
        config["envoy"]["destinations"][MCP_HOST] = f"127.0.0.1:{warehouse}"

    env = env_factory([task("t1", egress=[rule])], mutate=mutate)
    before = len(CALLS)
    assert tools_call(env, "list_tables", {}).status == 200  # not gated
    first = tools_call(env, "drop_table", {"table": "prices_q2"})
    error = first.json()["error"]
    assert first.status == 403 and error["data"]["reason"] == "approval_required"
    approval_id = error["data"]["approval_id"]
    assert operator.approve(approval_id, env.admin).returncode == 0

    other = tools_call(env, "drop_table", {"table": "prices_q3"})
    assert other.status == 403 and other.json()["error"]["data"]["reason"] == "approval_mismatch"
    assert other.json()["error"]["data"]["approval_id"] != approval_id
    assert (
        env.record(other.decision_id)["mcp"]["arguments_digest"]
        != env.record(first.decision_id)["mcp"]["arguments_digest"]
    )
    exact = tools_call(env, "drop_table", {"table": "prices_q2"}, rid=5)
    assert exact.status == 200, exact.body
    assert [c for c in CALLS[before:] if c[0] == "drop_table"] == [("drop_table", {"table": "prices_q2"})]
    assert env.record(exact.decision_id)["approval"]["status"] == "consumed"


def test_expired_approval(approvals_env: Callable[..., Env], operator: Operator) -> None:
    env = approvals_env()
    approval_id = env.send("DELETE", f"{ITEMS}/8").json()["approval_id"]
    assert operator.approve(approval_id, env.admin, ttl="1s").returncode == 0
    time.sleep(1.3)
    late = env.send("DELETE", f"{ITEMS}/8")
    assert (late.status, late.reason) == (403, "approval_expired")
    assert env.record(late.decision_id)["approval"]["id"] != approval_id
    assert not any(r.method == "DELETE" for r in env.upstream.requests())


def test_changed_policy_version(approvals_env: Callable[..., Env], operator: Operator) -> None:
    env = approvals_env()
    approval_id = env.send("DELETE", f"{ITEMS}/9").json()["approval_id"]
    assert operator.approve(approval_id, env.admin).returncode == 0
    digest = call_admin(env.admin, "GET", "/readyz")[1]["config_digest"]
    env.rewrite(lambda c: c["tasks"][0]["egress"][1].update(paths=["/v1/items/*", "/v1/archive/*"]))
    wait_until(
        lambda: call_admin(env.admin, "GET", "/readyz")[1]["config_digest"] != digest, timeout=10, what="the reload"
    )
    retry = env.send("DELETE", f"{ITEMS}/9")
    assert (retry.status, retry.reason) == (403, "approval_policy_changed")
    assert not any(r.method == "DELETE" for r in env.upstream.requests())


def test_approval_after_restart(approvals_env: Callable[..., Env], operator: Operator) -> None:
    """An approval survives a crash of the sidecar (kill -9) and is still good for exactly one call."""
    env = approvals_env()
    approval_id = env.send("DELETE", f"{ITEMS}/10").json()["approval_id"]
    assert operator.approve(approval_id, env.admin).returncode == 0
    proc = env.stack.sidecar.proc
    assert proc is not None
    proc.kill()
    proc.wait(10)
    env.stack.sidecar.start()
    env.stack.sidecar.wait_ready()
    env.upstream.jwks_url = env.admin + "/.well-known/jwks.json"  # the restarted sidecar's admin port
    retry = wait_reason(lambda: env.send("DELETE", f"{ITEMS}/10"), "allowed", "the restarted sidecar answers")
    assert env.record(retry.decision_id)["approval"]["id"] == approval_id
    replay = env.send("DELETE", f"{ITEMS}/10")
    assert replay.reason == "approval_replayed"
    assert [r.method for r in env.upstream.requests()].count("DELETE") == 1


# -- sensitivity -------------------------------------------------------------------------------------------
def test_sensitivity_above_the_task_maximum(env_factory: Callable[..., Env], scenario: Scenario) -> None:
    vault = {"name": "vault", "host": "vault.internal", "methods": ["GET"], "paths": ["*"]}
    reports = {**READ, "name": "reports", "paths": ["/v1/reports/*"], "sensitivity": "confidential"}

    def mutate(config: dict[str, Any], port: int) -> None:
        controls(scenario, sensitivity={"hosts": {"vault.internal": "restricted"}})(config, port)
        config["envoy"]["destinations"]["vault.internal"] = f"127.0.0.1:{port}"

    env = env_factory(
        [
            task("low", egress=[READ, vault, reports], max_sensitivity="internal", purpose="Summarise Q3 items"),
            task("high", egress=[READ, reports], max_sensitivity="confidential", purpose="Audit Q3 reports"),
        ],
        {API_HOST: TokenCheck(API_AUDIENCE, ISSUER)},
        mutate=mutate,
    )
    denied = env.send("GET", "http://vault.internal/secrets", {"x-agent-task": "low"})
    assert (denied.status, denied.reason) == (403, "sensitivity_not_allowed")
    record = env.record(denied.decision_id)
    assert record["sensitivity"] == "restricted" and record["purpose"] == "Summarise Q3 items"
    assert "above the task's max_sensitivity internal" in record["detail"]
    assert (
        env.send("GET", f"http://{API_HOST}/v1/reports/q3", {"x-agent-task": "low"}).reason == "sensitivity_not_allowed"
    )
    allowed = env.send("GET", f"http://{API_HOST}/v1/reports/q3", {"x-agent-task": "high"})
    assert allowed.status == 200
    assert env.upstream.requests()[-1].claims["sensitivity"] == "confidential"  # verified against the JWKS
    assert env.record(allowed.decision_id)["sensitivity"] == "confidential"
    plain = env.send("GET", f"{ITEMS}/1", {"x-agent-task": "low"})
    assert plain.status == 200 and env.upstream.requests()[-1].claims["sensitivity"] == "internal"  # the default
    assert metric(env, "agent_authz_decisions_by_sensitivity_total", sensitivity="restricted", decision="deny") == 1
    assert (
        metric(env, "agent_authz_task_info", task="high", purpose="Audit Q3 reports", max_sensitivity="confidential")
        == 1
    )


# -- out of the agent's reach --------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_agent_uid_cannot_approve_unfreeze_or_kill(
    approvals_env: Callable[..., Env], operator: Operator, scenario: Scenario
) -> None:
    """The agent (UID 1000) reaches the admin port, like anything in the pod: it cannot read the root
    issuer key, and every document it can make or replay is refused (and recorded)."""
    env = approvals_env()
    operator.key.chmod(0o600)  # the operator's key, never mounted into the pod: here, root's alone
    approval_id = env.send("DELETE", f"{ITEMS}/11").json()["approval_id"]
    operator.step("freeze", "subtree:t1")  # the operator freezes, unfreezes, freezes again
    operator.step("unfreeze", "subtree:t1")
    old_unfreeze = operator.actions.read_text().split()[-1]
    time.sleep(0.01)
    operator.step("freeze", "subtree:t1")
    wait_reason(lambda: env.send("GET", f"{ITEMS}/1"), "task_quarantined", "the operator's freeze")
    agent = call_admin(env.admin, "GET", "/readyz")[1]["agent"]

    # with the root key's path in hand, the agent's CLI cannot read the key
    cli = operator.cli(
        "task", "unfreeze", "subtree:t1", "--key", str(operator.key), "--admin", env.admin, prefix=as_user(AGENT_UID)
    )
    assert cli.returncode == 2 and "cannot read" in cli.stderr
    cli = operator.cli(
        "approve", approval_id, "--key", str(operator.key), "--admin", env.admin, prefix=as_user(AGENT_UID)
    )
    assert cli.returncode == 2

    done = subprocess.run(
        [
            *as_user(AGENT_UID),
            sys.executable,
            "-m",
            "tests.support.continuous",
            env.admin,
            approval_id,
            agent,
            old_unfreeze,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results == {
        "unsigned": [400, "control_malformed"],
        "forged_unfreeze": [403, "control_untrusted_signer"],
        "forged_kill": [403, "control_untrusted_signer"],
        "replayed_unfreeze": [200, None],  # known already: changes nothing
        "forged_approval": [403, "control_untrusted_signer"],
        "viewer_no_token": [403, "control_not_authorized"],
        "viewer_forged_token": [403, "control_untrusted_signer"],
    }, results
    assert env.send("GET", f"{ITEMS}/1").reason == "task_quarantined"
    assert call_admin(env.admin, "GET", "/v1/approvals")[1]["approvals"][0]["status"] == "pending"
    refused = control_records(env, "not_authorized") + control_records(env, "bad_request")
    assert len(refused) == 6 and all(r["decision"] == "deny" for r in refused)
    assert not control_records(env, "approval_granted") and not control_records(env, "task_killed")
