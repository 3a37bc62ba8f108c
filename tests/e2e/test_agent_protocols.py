"""MCP and A2A rules through real Envoy, driven by the official SDKs (``mcp`` 2.3.0, ``a2a-sdk`` 1.3.0).

The agent is the SDK's own client in a subprocess that reaches the network only through
``HTTP_PROXY`` (:mod:`sidecar.demo.mcp_agent`); the servers are built with the SDKs
(:mod:`sidecar.demo.agent_servers`). Hostile bodies the SDK would never send are sent raw to the same
Envoy listener. Every reason code of the agent-protocol rules is produced here, each with its record.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.demo.agent_servers import CALLS, ServerThread, risk_agent_app, warehouse_app
from sidecar.harness import AuthzStack
from tests.support.agent_protocols import (
    A2A_HOST,
    CALLS_PLAN,
    EXPECTED,
    MCP_HOST,
    MCP_URL,
    RISK,
    WAREHOUSE,
    reason_of,
    run_agent,
)
from tests.support.config import task
from tests.support.stack import Env, Reply

pytestmark = pytest.mark.e2e

JSON = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, int]]:
    mcp = ServerThread(warehouse_app([MCP_HOST]))
    a2a = ServerThread(risk_agent_app(f"http://{A2A_HOST}/"))
    try:
        yield {MCP_HOST: mcp.start(), A2A_HOST: a2a.start()}
    finally:
        mcp.stop()
        a2a.stop()


@pytest.fixture
def stack(env_factory: Callable[..., Env], servers: dict[str, int]) -> Callable[..., Env]:
    def make(rules: list[dict[str, Any]] | None = None, **envoy: Any) -> Env:
        def mutate(config: dict[str, Any], _: int) -> None:
            config["envoy"]["destinations"].update({h: f"127.0.0.1:{p}" for h, p in servers.items()})
            config["envoy"].update(envoy)

        return env_factory([task(egress=rules if rules is not None else [WAREHOUSE, RISK])], mutate=mutate)

    return make


def rpc_records(env: Env, protocol: str = "mcp") -> list[dict[str, Any]]:
    return [r for r in env.records() if protocol in r]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_mcp_sdk_client_through_envoy(stack: Callable[..., Env], mode: str) -> None:
    """2026-07-28 (``auto``: ``server/discover``, Mcp-Method/Mcp-Name headers, JSON answers) and
    2025-11-25 (``legacy``: ``initialize``, a session, no headers, SSE answers): the same outcomes."""
    env = stack()
    before = len(CALLS)
    results = run_agent(env.stack.egress_proxy, [{"mcp": MCP_URL, "mode": mode, "calls": CALLS_PLAN}])
    assert [reason_of(r) for r in results] == EXPECTED, results
    assert results[0]["result"] == ["query", "list_tables"]  # tools/list filtered: no drop_table
    assert results[1]["result"] == {"result": "3 rows from prices_q3"}
    denied = results[2]["error"]
    assert denied["code"] == -32030 and denied["data"]["detail"] == "argument /table does not satisfy 'in'"
    # the server executed exactly the allowed calls (the budget of 3 query calls included)
    assert [c[0] for c in CALLS[before:]] == ["query", "list_tables", "query", "query"]

    records = rpc_records(env)
    calls = [r for r in records if r["mcp"]["method"] == "tools/call"]
    assert [(r["mcp"]["tool"], r["reason"]) for r in calls] == [
        ("query", "allowed"),
        ("query", "argument_not_allowed"),
        ("drop_table", "tool_not_allowed"),
        ("list_tables", "allowed"),
        ("query", "allowed"),
        ("query", "allowed"),
        ("query", "budget_exhausted"),
    ]
    first = calls[0]["mcp"]
    assert first["arguments"] == {"/table": "prices_q3"} and first["arguments_digest"].startswith("sha256:")
    assert first["decided_from"] == "body"
    assert "salaries" not in json.dumps(calls[1]) and "secret_column" not in json.dumps(records)
    assert calls[1]["mcp"]["arguments_digest"] != first["arguments_digest"]
    listed = next(r for r in records if r["mcp"]["method"] == "tools/list")
    assert listed["decision"] == "allow"
    assert {r["mcp"].get("resource") for r in records if r["mcp"]["method"] == "resources/read"} == {
        "table://prices_q3",
        "table://salaries",
    }
    if mode == "auto":  # the CLI and the viewer's API filter by tool
        logs = subprocess.run(
            [sys.executable, "-m", "sidecar", "logs", str(env.state / "decisions.log"), "--tool", "query", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        shown = [json.loads(line) for line in logs.stdout.splitlines()]
        assert [r["reason"] for r in shown] == [r["reason"] for r in calls if r["mcp"]["tool"] == "query"]
        table = subprocess.run(
            [sys.executable, "-m", "sidecar", "logs", str(env.state / "decisions.log"), "--rpc-method", "tools/list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "[tools/list]" in table.stdout and "tools/call" not in table.stdout
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(env.admin + "/decisions/api/records?tool=drop_table", timeout=10) as response:
            api = json.loads(response.read())["records"]
        assert [(r["mcp"]["tool"], r["reason"]) for r in api] == [("drop_table", "tool_not_allowed")]
    handshake = "server/discover" if mode == "auto" else "initialize"
    assert any(r["mcp"]["method"] == handshake for r in records)
    if mode == "legacy":  # the session's notification and, at the end, GET stream and DELETE
        assert any(r["mcp"]["method"] == "notifications/initialized" for r in records)


def test_a2a_sdk_client_through_envoy(stack: Callable[..., Env]) -> None:
    env = stack()
    plan = [{"a2a": f"http://{A2A_HOST}/", "text": "portfolio A"}, {"a2a": f"http://{A2A_HOST}/", "get_task": "t-1"}]
    sent, got = run_agent(env.stack.egress_proxy, plan)
    assert sent["ok"] and sent["result"] == ["risk score for: portfolio A"]
    assert not got["ok"] and "403" in got["error"]["message"]  # the A2A client reports the HTTP status
    records = rpc_records(env, "a2a")
    assert [(r["a2a"]["method"], r["reason"]) for r in records] == [
        ("SendMessage", "allowed"),
        ("GetTask", "rpc_method_not_allowed"),
    ]
    card = [r for r in env.records() if r["path"] == "/.well-known/agent-card.json"]
    assert card and all(r["decision"] == "allow" for r in card)


def post(env: Env, body: bytes, headers: dict[str, str] | None = None, path: str = "/mcp") -> Reply:
    return env.send("POST", f"http://{MCP_HOST}{path}", {**JSON, **(headers or {})}, body)


def rpc(method: str, params: dict[str, Any] | None = None, rid: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params is not None else {})}


CALL_LIST_TABLES = json.dumps(rpc("tools/call", {"name": "list_tables", "arguments": {}}, 9)).encode()


HOSTILE = [
    (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_tables","name":"drop_table"}}',
        {},
        400,
        "mcp_ambiguous_body",
        -32600,
        "duplicate_key",
    ),
    (json.dumps([rpc("tools/call", {"name": "drop_table"})]).encode(), {}, 400, "mcp_ambiguous_body", -32600, "batch"),
    (
        gzip.compress(CALL_LIST_TABLES),
        {"content-encoding": "gzip"},
        400,
        "mcp_ambiguous_body",
        -32600,
        "content_encoding",
    ),
    (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_\xff"}}',
        {},
        400,
        "mcp_ambiguous_body",
        -32600,
        "not_utf8",
    ),
    (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_\\ud800"}}',
        {},
        400,
        "mcp_ambiguous_body",
        -32600,
        "lone_surrogate",
    ),
    (b"\xef\xbb\xbf" + CALL_LIST_TABLES, {}, 400, "mcp_ambiguous_body", -32600, "bom"),
    (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_tables","arguments":'
        + b"[" * 40
        + b"]" * 40
        + b"}}",
        {},
        400,
        "mcp_ambiguous_body",
        -32600,
        "too_deep",
    ),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call",', {}, 400, "mcp_invalid_body", -32600, "invalid_json"),
    (CALL_LIST_TABLES, {"content-type": "text/plain"}, 400, "mcp_invalid_body", -32600, "content_type"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}', {}, 400, "mcp_invalid_body", -32600, "not_jsonrpc"),
    (
        json.dumps(rpc("tools/call", {"name": "drop_table"}, 7)).encode(),
        {"mcp-method": "tools/call", "mcp-name": "list_tables"},
        400,
        "mcp_header_mismatch",
        -32020,
        "Mcp-Name",
    ),
    (CALL_LIST_TABLES, {"mcp-method": "tools/list"}, 400, "mcp_header_mismatch", -32020, "Mcp-Method"),
    (
        json.dumps(rpc("logging/setLevel", {"level": "debug"})).encode(),
        {},
        403,
        "rpc_method_not_allowed",
        -32030,
        "the rule's",
    ),
    (
        json.dumps(rpc("prompts/get", {"name": "leak_prompt"})).encode(),
        {},
        403,
        "prompt_not_allowed",
        -32030,
        "no prompts",
    ),
    (CALL_LIST_TABLES + b" " * 1100, {}, 413, "mcp_body_too_large", -32600, "too_large"),
]


def test_hostile_bodies_through_envoy(stack: Callable[..., Env]) -> None:
    """Bodies the SDK never sends, raw to Envoy: each denied with its reason, a well-formed JSON-RPC
    error body (the request's id when it could be read), a record, and nothing reaching the server."""
    env = stack(rpc_body_cap="1KiB")
    before = len(CALLS)
    for body, headers, status, reason, code, sub_code in HOSTILE:
        reply = post(env, body, headers)
        assert (reply.status, reply.reason) == (status, reason), (sub_code, reply.body[:300])
        error = reply.json()
        assert error["jsonrpc"] == "2.0" and error["error"]["code"] == code, sub_code
        assert error["error"]["data"]["reason"] == reason, sub_code
        assert error["error"]["data"]["detail"].startswith(sub_code), error
        assert error["id"] in (None, 1, 7, 9), sub_code
        assert reply.headers["content-type"] == "application/json"
        record = env.record(reply.decision_id)
        assert (record["decision"], record["reason"], record["status"]) == ("deny", reason, status)
    assert len(CALLS) == before
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    modern = json.dumps(rpc("tools/call", {"name": "list_tables", "arguments": {}, "_meta": meta}, 9)).encode()
    allowed = post(
        env, modern, {"mcp-method": "tools/call", "mcp-name": "list_tables", "mcp-protocol-version": "2026-07-28"}
    )
    assert allowed.status == 200 and CALLS[before:] == [("list_tables", {})], allowed.body


def test_body_over_the_cap_sent_chunked(stack: Callable[..., Env]) -> None:
    """Without Content-Length the cap holds as well (Envoy buffers cap + 1 bytes and stops)."""
    import http.client

    env = stack(rpc_body_cap="1KiB")
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    try:
        conn.putrequest("POST", MCP_URL, skip_accept_encoding=True)
        for name, value in JSON.items():
            conn.putheader(name, value)
        conn.putheader("transfer-encoding", "chunked")
        conn.endheaders()
        chunk = CALL_LIST_TABLES + b" " * 4000
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
        response = conn.getresponse()
        assert response.status == 413 and response.getheader("x-agent-authz-reason") == "mcp_body_too_large"
        response.read()
    finally:
        conn.close()


def test_decisions_from_headers(stack: Callable[..., Env]) -> None:
    """A host in ``envoy.mcp_header_decisions``: 2026-07-28 requests (with Mcp-Method) are judged on
    their headers, no body buffered; a tool with argument constraints then cannot be judged
    (``mcp_body_unavailable``); 2025-11-25 requests (no headers) still go through the body route."""
    env = stack(mcp_header_decisions=[MCP_HOST])
    calls = [
        ["list_tools"],
        ["call_tool", "list_tables", {}],
        ["call_tool", "query", {"table": "prices_q3"}],
        ["call_tool", "drop_table", {"table": "x"}],
    ]
    modern = run_agent(env.stack.egress_proxy, [{"mcp": MCP_URL, "mode": "auto", "calls": calls}])
    assert [reason_of(r) for r in modern] == ["allowed", "allowed", "mcp_body_unavailable", "tool_not_allowed"]
    assert modern[0]["result"] == ["query", "list_tables"]  # filtered all the same
    decided = {(r["mcp"]["method"], r["mcp"].get("tool")): r["mcp"]["decided_from"] for r in rpc_records(env)}
    assert set(decided.values()) == {"headers"} and ("tools/call", "drop_table") in decided
    legacy = run_agent(env.stack.egress_proxy, [{"mcp": MCP_URL, "mode": "legacy", "calls": calls[2:3]}])
    assert [reason_of(r) for r in legacy] == ["allowed"]
    assert rpc_records(env)[-3]["mcp"]["decided_from"] == "body"


def test_plain_http_rule_and_other_hosts_are_unchanged(stack: Callable[..., Env]) -> None:
    """An MCP host's neighbours: a plain rule on another host buffers nothing and keeps its JSON deny body."""
    env = stack(
        [
            WAREHOUSE,
            {
                "name": "api",
                "host": "api.internal",
                "methods": ["GET"],
                "paths": ["/v1/items/*"],
                "audience": "https://api.internal",
            },
        ]
    )
    assert env.send("GET", "http://api.internal/v1/items/1").status == 200
    denied = env.send("POST", "http://api.internal/v1/items/1", {"content-type": "application/json"}, b"{}")
    assert denied.status == 403 and set(denied.json()) == {"decision_id", "reason"}
    assert "mcp" not in env.record(denied.decision_id)


def test_delegated_tool_rules_narrow_through_envoy(tmp_path: Path, short_dir: Path, servers: dict[str, int]) -> None:
    """An orchestrator delegates a narrower MCP rule; a widening one is refused; the sub-agent's own
    Envoy and sidecar enforce the narrowed tools and arguments (and filter tools/list to them)."""
    from sidecar.harness import SidecarProcess
    from tests.support.grants_env import ORCH, ROOT_TASK, SUB, Scenario, api

    root = {
        **ROOT_TASK,
        "egress": [
            {
                **WAREHOUSE,
                "max_calls": 20,
                "tools": [
                    {
                        "name": "query",
                        "arguments": {"/table": {"prefix": "prices_"}},
                        "max_calls": 10,
                        "record": ["/table"],
                    },
                    "list_tables",
                ],
            }
        ],
    }
    sc = Scenario(tmp_path)
    (short_dir / "o").mkdir()
    (short_dir / "s").mkdir()
    orch = SidecarProcess(
        sc.agent_config("orch", ORCH, short_dir / "o", grants=[sc.root_grant(root)]), log_dir=tmp_path / "orch"
    )
    sub_config = sc.agent_config("sub", SUB, short_dir / "s")
    config = yaml.safe_load(sub_config.read_text())
    config["envoy"]["destinations"] = {MCP_HOST: f"127.0.0.1:{servers[MCP_HOST]}"}
    config["envoy"]["rpc_hosts"] = {MCP_HOST: "mcp"}  # the task arrives as a grant: Envoy must know the host
    sub_config.write_text(yaml.safe_dump(config))
    sub = AuthzStack(sub_config, tmp_path / "sub")
    try:
        orch.start()
        sub.start()
        orch.wait_ready()
        base = {"subject": SUB, "ttl": "10m", "name": "prices", "max_calls": 5}
        wide = {
            **base,
            "egress": [
                {
                    **WAREHOUSE,
                    "max_calls": 5,
                    "tools": [
                        {
                            "name": "query",
                            "arguments": {"/table": {"prefix": "p"}},
                            "max_calls": 2,
                            "record": ["/table"],
                        }
                    ],
                }
            ],
        }
        status, refused = api(orch, "POST", "/v1/tasks/q3/delegate", wide)
        assert status == 400 and refused["error"] == "grant_widening" and ".tools" in refused["detail"], refused
        dropping = {**base, "egress": [{**WAREHOUSE, "max_calls": 5, "tools": ["drop_table"]}]}
        status, refused = api(orch, "POST", "/v1/tasks/q3/delegate", dropping)
        assert status == 400 and "drop_table" in refused["detail"], refused
        narrow = {
            **base,
            "egress": [
                {
                    **WAREHOUSE,
                    "max_calls": 5,
                    "tools": [
                        {
                            "name": "query",
                            "arguments": {"/table": {"equals": "prices_q3"}},
                            "max_calls": 2,
                            "record": ["/table"],
                        }
                    ],
                }
            ],
        }
        status, issued = api(orch, "POST", "/v1/tasks/q3/delegate", narrow)
        assert status == 201, issued
        status, accepted = api(sub.sidecar, "POST", "/v1/tasks", issued["grant"])
        assert status == 201, accepted
        calls = [
            ["list_tools"],
            ["call_tool", "query", {"table": "prices_q3"}],
            ["call_tool", "query", {"table": "prices_q2"}],
            ["call_tool", "list_tables", {}],
        ]
        results = run_agent(sub.egress_proxy, [{"mcp": MCP_URL, "calls": calls}])
        assert [reason_of(r) for r in results] == ["allowed", "allowed", "argument_not_allowed", "tool_not_allowed"]
        assert results[0]["result"] == ["query"]
        records = [json.loads(line) for line in (tmp_path / "sub" / "decisions.log").read_text().splitlines()]
        call = next(r for r in records if r.get("mcp", {}).get("tool") == "query")
        assert call["txn"] == "q3" and call["act"] == [SUB, ORCH] and call["task_id"] == "q3/prices"
    finally:
        sub.stop()
        orch.stop()


def test_demo_mcp_scenario(tmp_path: Path) -> None:
    """``agent-authz demo --scenario mcp`` exits 0, having checked every outcome and both logs itself."""
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--scenario", "mcp", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every outcome matched (11 checks)" in done.stdout and "MISMATCH" not in done.stdout
    for line in ("query another table", "argument_not_allowed", "tool_not_allowed", "['query']", "SendMessage"):
        assert line in done.stdout
    records = [json.loads(x) for x in (tmp_path / "market-data" / "decisions.log").read_text().splitlines()]
    assert any(r.get("mcp", {}).get("tool") == "drop_table" and r["reason"] == "tool_not_allowed" for r in records)
    assert "never-in-the-log" not in (tmp_path / "market-data" / "decisions.log").read_text()
