"""Tool, argument, resource, prompt and method rules; header-only decisions; globs; headers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sidecar.agentproto.headers import HeaderError, read_headers
from sidecar.agentproto.names import Glob, NameSet
from sidecar.agentproto.rules import Refusal, RpcVerdict, compile_protocol, json_equal, judge
from sidecar.agentproto.spec import AgentProtocolSpec

CAP = 4096
JSON = {"content-type": "application/json"}

WAREHOUSE: dict[str, Any] = {
    "protocol": "mcp",
    "tools": [
        {
            "name": "query",
            "arguments": {"/table": {"in": ["prices_q3", "prices_q2"]}, "/limit": {"equals": 100}},
            "max_calls": 5,
            "record": ["/table"],
        },
        {"name": "export", "arguments": {"/path": {"prefix": "reports/"}, "/fmt": {"pattern": "csv|json"}}},
        "list_*",
    ],
    "resources": ["table://prices_*"],
    "prompts": ["summarize"],
}


def policy(spec: dict[str, Any] = WAREHOUSE) -> Any:
    compiled = compile_protocol(AgentProtocolSpec.model_validate(spec), "warehouse")
    assert compiled is not None
    return compiled


def call(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    spec: dict[str, Any] = WAREHOUSE,
    body: bool = True,
) -> RpcVerdict:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        message["params"] = params
    return judge(
        policy(spec),
        http_method="POST",
        headers={**JSON, **(headers or {})},
        body=json.dumps(message).encode() if body else None,
        cap=CAP,
    )


def tool(name: str, **arguments: Any) -> RpcVerdict:
    return call("tools/call", {"name": name, "arguments": arguments})


def test_tools_and_arguments() -> None:
    allowed = tool("query", table="prices_q3", limit=100, sql="select 1")
    assert allowed.refusal is None and [t.name.pattern for t in allowed.tools] == ["query"]
    record = allowed.record(allowed.tools[0])
    assert record["tool"] == "query" and record["arguments"] == {"/table": "prices_q3"}
    assert record["arguments_digest"].startswith("sha256:") and "sql" not in json.dumps(record)
    assert tool("query", table="salaries", limit=100).refusal is Refusal.ARGUMENT_NOT_ALLOWED
    assert tool("query", table="prices_q3").refusal is Refusal.ARGUMENT_NOT_ALLOWED  # /limit missing
    assert tool("query", table="prices_q3", limit=100.0).refusal is None  # JSON numbers: 100 is 100.0
    assert tool("query", table="prices_q3", limit="100").refusal is Refusal.ARGUMENT_NOT_ALLOWED
    assert tool("drop_table", table="prices_q3").refusal is Refusal.TOOL_NOT_ALLOWED
    assert tool("list_tables").refusal is None and tool("list").refusal is Refusal.TOOL_NOT_ALLOWED
    assert tool("export", path="reports/q3.csv", fmt="csv").refusal is None
    assert tool("export", path="secrets/q3.csv", fmt="csv").refusal is Refusal.ARGUMENT_NOT_ALLOWED
    assert tool("export", path="reports/q3.csv", fmt="csvx").refusal is Refusal.ARGUMENT_NOT_ALLOWED  # full match
    assert tool("export", path=["reports/"], fmt="csv").refusal is Refusal.ARGUMENT_NOT_ALLOWED  # not a string
    denied = tool("query", table="salaries", limit=100)
    assert "salaries" not in denied.detail and "salaries" not in json.dumps(denied.record(None))


def test_a_name_listed_twice_is_either_entry() -> None:
    spec = {
        "protocol": "mcp",
        "tools": [
            {"name": "q", "arguments": {"/t": {"equals": "a"}}},
            {"name": "q", "arguments": {"/t": {"equals": "b"}}},
        ],
    }
    assert [t.budget_key for t in policy(spec).tools] == ["warehouse/tool:q#0", "warehouse/tool:q#1"]
    assert call("tools/call", {"name": "q", "arguments": {"t": "b"}}, spec=spec).tools[0].budget_key.endswith("#1")
    assert call("tools/call", {"name": "q", "arguments": {"t": "c"}}, spec=spec).refusal is Refusal.ARGUMENT_NOT_ALLOWED


def test_resources_prompts_methods() -> None:
    assert call("resources/read", {"uri": "table://prices_q3"}).refusal is None
    assert call("resources/read", {"uri": "table://salaries"}).refusal is Refusal.RESOURCE_NOT_ALLOWED
    assert call("prompts/get", {"name": "summarize"}).refusal is None
    assert call("prompts/get", {"name": "leak"}).refusal is Refusal.PROMPT_NOT_ALLOWED
    for method in ("initialize", "ping", "server/discover", "notifications/initialized", "tools/list", "prompts/list"):
        assert call(method, {}).refusal is None, method
    assert call("logging/setLevel", {}).refusal is Refusal.RPC_METHOD_NOT_ALLOWED
    assert call("tools/call", {"arguments": {}}).refusal is Refusal.MCP_INVALID_BODY
    assert call("tools/call", {"name": "query", "arguments": []}).refusal is Refusal.MCP_INVALID_BODY
    answer = judge(policy(), http_method="POST", headers=JSON, body=b'{"jsonrpc":"2.0","id":3,"result":{}}', cap=CAP)
    assert answer.refusal is None and answer.fields["response"] is True
    assert judge(policy(), http_method="GET", headers={}, body=b"", cap=CAP).refusal is None  # 2025-11-25 stream
    drop = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "drop_table"}}).encode()
    for method in ("PUT", "PATCH", "GET", "DELETE"):  # a body is judged whatever the method
        assert judge(policy(), http_method=method, headers=JSON, body=drop, cap=CAP).refusal is Refusal.TOOL_NOT_ALLOWED
    assert judge(policy(), http_method="PUT", headers=JSON, body=b"", cap=CAP).refusal is Refusal.MCP_INVALID_BODY
    narrow = {**WAREHOUSE, "rpc_methods": ["initialize", "notifications/initialized"]}
    assert call("tools/list", {}, spec=narrow).refusal is Refusal.RPC_METHOD_NOT_ALLOWED


def test_a2a() -> None:
    spec = {"protocol": "a2a", "rpc_methods": ["SendMessage", "GetTask", "message/send"]}
    assert call("SendMessage", {"message": {}}, spec=spec).refusal is None
    assert call("message/send", {}, spec=spec).refusal is None
    verdict = call("CancelTask", {"id": "t"}, spec=spec)
    assert verdict.refusal is Refusal.RPC_METHOD_NOT_ALLOWED and verdict.fields["method"] == "CancelTask"
    assert call("SendMessage", {}, spec=spec, headers={"mcp-method": "tools/list"}).refusal is None  # no MCP headers
    assert call("SendMessage", {}, spec=spec, body=False).refusal is Refusal.MCP_BODY_UNAVAILABLE
    answer = judge(
        policy(spec), http_method="POST", headers=JSON, body=b'{"jsonrpc":"2.0","id":3,"result":{}}', cap=CAP
    )
    assert answer.refusal is Refusal.RPC_METHOD_NOT_ALLOWED


def test_headers_against_the_body() -> None:
    h = {"mcp-method": "tools/call", "mcp-name": "list_tables"}
    assert call("tools/call", {"name": "list_tables"}, headers=h).refusal is None
    assert call("tools/call", {"name": "drop_table"}, headers=h).refusal is Refusal.MCP_HEADER_MISMATCH
    assert call("tools/list", {}, headers=h).refusal is Refusal.MCP_HEADER_MISMATCH
    assert call("tools/call", {"name": "list_tables"}, headers={"mcp-method": "tools/call"}).refusal is (
        Refusal.MCP_HEADER_MISMATCH
    )
    assert (
        call("tools/call", {"name": "list_tables"}, headers={**h, "mcp-method": "tools/call,tools/call"}).refusal
        is Refusal.MCP_HEADER_MISMATCH
    )
    encoded = "=?base64?" + base64.b64encode("list_é".encode()).decode() + "?="
    assert call("tools/call", {"name": "list_é"}, headers={**h, "mcp-name": encoded}).refusal is None
    assert call("tools/call", {"name": "list_é"}, headers={**h, "mcp-name": "list_é"}).refusal is (
        Refusal.MCP_HEADER_MISMATCH
    )
    with pytest.raises(HeaderError):
        read_headers({"mcp-name": "x"})
    with pytest.raises(HeaderError):
        read_headers({"mcp-method": "tools/call", "mcp-name": "=?base64?YQ?="})


def test_decided_from_headers_without_a_body() -> None:
    h = {"mcp-method": "tools/call", "mcp-name": "list_tables"}
    verdict = call("tools/call", {"name": "list_tables"}, headers=h, body=False)
    assert verdict.refusal is None and verdict.fields["decided_from"] == "headers"
    assert call("x", headers={**h, "mcp-name": "drop_table"}, body=False).refusal is Refusal.TOOL_NOT_ALLOWED
    constrained = call("x", headers={**h, "mcp-name": "query"}, body=False)
    assert constrained.refusal is Refusal.MCP_BODY_UNAVAILABLE
    assert call("x", headers={"mcp-method": "tools/list"}, body=False).refusal is None
    assert call("x", headers={"mcp-method": "tools/call"}, body=False).refusal is Refusal.MCP_HEADER_MISMATCH
    assert call("x", body=False).refusal is Refusal.MCP_BODY_UNAVAILABLE
    assert call("x", headers={"mcp-method": "resources/read", "mcp-name": "table://salaries"}, body=False).refusal is (
        Refusal.RESOURCE_NOT_ALLOWED
    )


def test_body_problems_map_to_reasons() -> None:
    def raw(body: bytes, **headers: str) -> Refusal | None:
        return judge(policy(), http_method="POST", headers={**JSON, **headers}, body=body, cap=64).refusal

    assert raw(b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"ping"}') is Refusal.MCP_AMBIGUOUS_BODY
    assert raw(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]') is Refusal.MCP_AMBIGUOUS_BODY
    assert (
        raw(b'{"jsonrpc":"2.0","id":1,"method":"ping"}', **{"content-encoding": "gzip"}) is Refusal.MCP_AMBIGUOUS_BODY
    )
    assert raw(b'{"jsonrpc":"2.0","id":1,"method":"\xff"}') is Refusal.MCP_AMBIGUOUS_BODY
    assert raw(b"{not json") is Refusal.MCP_INVALID_BODY
    assert raw(b" " * 65) is Refusal.MCP_BODY_TOO_LARGE


def test_spec_validation() -> None:
    bad: list[dict[str, Any]] = [
        {"protocol": "http", "tools": ["q"]},
        {"protocol": "a2a"},
        {"protocol": "a2a", "rpc_methods": ["SendMessage"], "tools": ["q"]},
        {"protocol": "mcp", "rpc_methods": ["tools/call"]},
        {"protocol": "mcp", "rpc_methods": ["tools/*"]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"table": {"equals": 1}}}]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {"equals": 1, "prefix": "a"}}}]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {}}}]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {"pattern": "(a)\\1"}}}]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {"pattern": "a" * 257}}}]},
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {"in": []}}}]},
        {"protocol": "mcp", "tools": [{"name": "has space"}]},
        {"protocol": "mcp", "tools": [{"name": "q", "record": ["t"]}]},
        {"protocol": "mcp", "tools": [{"name": "q", "max_calls": -1}]},
    ]
    for spec in bad:
        with pytest.raises(ValidationError):
            AgentProtocolSpec.model_validate(spec)
    null = AgentProtocolSpec.model_validate(
        {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/t": {"equals": None}}}]}
    )
    assert (
        call("tools/call", {"name": "q", "arguments": {"t": None}}, spec=null.model_dump(by_alias=True)).refusal is None
    )
    assert call("tools/call", {"name": "q", "arguments": {}}, spec=null.model_dump(by_alias=True)).refusal is (
        Refusal.ARGUMENT_NOT_ALLOWED
    )


def test_re2_is_linear() -> None:
    """A pattern that backtracks exponentially in Python's re is matched by RE2 at once."""
    spec = {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/s": {"pattern": "(a+)+b"}}}]}
    assert call("tools/call", {"name": "q", "arguments": {"s": "a" * 3000 + "c"}}, spec=spec).refusal is (
        Refusal.ARGUMENT_NOT_ALLOWED
    )


def test_json_pointer_escapes_and_arrays() -> None:
    spec = {"protocol": "mcp", "tools": [{"name": "q", "arguments": {"/a~1b/0/c~0d": {"equals": 1}}}]}
    assert call("tools/call", {"name": "q", "arguments": {"a/b": [{"c~d": 1}]}}, spec=spec).refusal is None
    assert call("tools/call", {"name": "q", "arguments": {"a/b": {"0": {"c~d": 1}}}}, spec=spec).refusal is None
    for bad in ([], [{"c~d": 2}], {"00": {"c~d": 1}}):
        args = {"a/b": bad} if not isinstance(bad, dict) else {"a/b": [bad]}
        assert call("tools/call", {"name": "q", "arguments": args}, spec=spec).refusal is Refusal.ARGUMENT_NOT_ALLOWED


def test_json_equal() -> None:
    assert json_equal(1, 1.0) and not json_equal(True, 1) and not json_equal(0, False) and json_equal(None, None)
    assert json_equal({"a": [1, "x"]}, {"a": [1.0, "x"]}) and not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal("1", 1) and not json_equal([1], [1, 1])


_names = st.text(alphabet="ab_./", max_size=8)
_globs = st.text(alphabet="ab_*", max_size=6)


@settings(max_examples=500, deadline=None)
@given(_globs, _names)
def test_glob_matches_like_fnmatch_star(pattern: str, name: str) -> None:
    import re

    expected = re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), name, re.S) is not None
    assert Glob.compile(pattern).matches(name) is expected


@settings(max_examples=500, deadline=None)
@given(_globs, _globs, st.lists(_names, max_size=20))
def test_glob_covers_is_sound(parent: str, child: str, names: list[str]) -> None:
    """If a parent pattern covers a child pattern, no name the child matches escapes the parent."""
    p, c = Glob.compile(parent), Glob.compile(child)
    if p.covers(c):
        for name in [*names, child.replace("*", ""), child.replace("*", "ab")]:
            if c.matches(name):
                assert p.matches(name)


def test_name_sets() -> None:
    s = NameSet.compile(["a", "b*", "a"])
    assert s.matches("a") and s.matches("bcd") and not s.matches("c") and s.patterns == ("a", "b*")
    assert (
        NameSet.compile(["*"]).covers(s)
        and s.covers(NameSet.compile(["bx*", "a"]))
        and not s.covers(NameSet.compile(["*"]))
    )
