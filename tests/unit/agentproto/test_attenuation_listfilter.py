"""Attenuation of agent-protocol rules (with a property test) and the tools/list filter."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.agentproto.attenuation import protocol_within
from sidecar.agentproto.digest import arguments_digest, recorded_arguments
from sidecar.agentproto.listfilter import FilterError, error_body, filter_tools_list
from sidecar.agentproto.rules import compile_protocol, judge
from sidecar.agentproto.spec import AgentProtocolSpec

PARENT: dict[str, Any] = {
    "protocol": "mcp",
    "tools": [
        {"name": "query", "arguments": {"/table": {"prefix": "prices_"}}, "max_calls": 10, "record": ["/table"]},
        "list_*",
    ],
    "resources": ["table://*"],
    "prompts": ["summarize", "explain"],
}


def within(child: dict[str, Any], parent: dict[str, Any] = PARENT) -> tuple[str, str] | None:
    return protocol_within(AgentProtocolSpec.model_validate(child), AgentProtocolSpec.model_validate(parent))


def test_narrowing_is_accepted() -> None:
    child = {
        "protocol": "mcp",
        "tools": [
            {
                "name": "query",
                "arguments": {"/table": {"equals": "prices_q3"}},
                "max_calls": 3,
                "record": ["/table", "/sql"],
            },
            {
                "name": "query",
                "arguments": {"/table": {"in": ["prices_q2", "prices_q1"]}},
                "max_calls": 10,
                "record": ["/table"],
            },
            {
                "name": "query",
                "arguments": {"/table": {"prefix": "prices_q"}, "/x": {"equals": 1}},
                "max_calls": 1,
                "record": ["/table"],
            },
            "list_tables",
            "list_t*",
        ],
        "resources": ["table://prices_q3"],
        "prompts": ["summarize"],
        "rpc_methods": ["initialize", "notifications/initialized"],
    }
    assert within(child) is None
    assert within({"protocol": "mcp"}) is None  # no tools at all
    assert within(child, {"protocol": "http"}) is None  # a plain rule holds an MCP rule


@pytest.mark.parametrize(
    ("child", "field"),
    [
        ({"protocol": "http"}, "protocol"),
        ({"protocol": "a2a", "rpc_methods": ["SendMessage"]}, "protocol"),
        ({"protocol": "mcp", "tools": ["drop_table"]}, "tools"),
        ({"protocol": "mcp", "tools": ["*"]}, "tools"),
        ({"protocol": "mcp", "tools": [{"name": "query", "max_calls": 1, "record": ["/table"]}]}, "tools"),
        (
            {
                "protocol": "mcp",
                "tools": [
                    {
                        "name": "query",
                        "arguments": {"/table": {"equals": "salaries"}},
                        "max_calls": 1,
                        "record": ["/table"],
                    }
                ],
            },
            "tools",
        ),
        (
            {
                "protocol": "mcp",
                "tools": [
                    {"name": "query", "arguments": {"/table": {"prefix": "p"}}, "max_calls": 1, "record": ["/table"]}
                ],
            },
            "tools",
        ),
        (
            {
                "protocol": "mcp",
                "tools": [
                    {
                        "name": "query",
                        "arguments": {"/table": {"pattern": "prices_.*"}},
                        "max_calls": 1,
                        "record": ["/table"],
                    }
                ],
            },
            "tools",
        ),
        (
            {
                "protocol": "mcp",
                "tools": [{"name": "query", "arguments": {"/table": {"equals": "prices_q3"}}, "record": ["/table"]}],
            },
            "tools",
        ),
        (
            {
                "protocol": "mcp",
                "tools": [
                    {
                        "name": "query",
                        "arguments": {"/table": {"equals": "prices_q3"}},
                        "max_calls": 11,
                        "record": ["/table"],
                    }
                ],
            },
            "tools",
        ),
        (
            {
                "protocol": "mcp",
                "tools": [{"name": "query", "arguments": {"/table": {"equals": "prices_q3"}}, "max_calls": 1}],
            },
            "tools",
        ),
        ({"protocol": "mcp", "resources": ["*"]}, "resources"),
        ({"protocol": "mcp", "prompts": ["leak"]}, "prompts"),
        ({"protocol": "mcp", "rpc_methods": ["logging/setLevel"]}, "rpc_methods"),
    ],
)
def test_widening_is_refused(child: dict[str, Any], field: str) -> None:
    failure = within(child)
    assert failure is not None and failure[0] == field


def test_a2a_methods_narrow() -> None:
    parent = {"protocol": "a2a", "rpc_methods": ["SendMessage", "GetTask"]}
    assert within({"protocol": "a2a", "rpc_methods": ["GetTask"]}, parent) is None
    assert within({"protocol": "a2a", "rpc_methods": ["CancelTask"]}, parent) == (
        "rpc_methods",
        "['CancelTask'] is not within ['GetTask', 'SendMessage']",
    )


_values = st.sampled_from(["prices_q3", "prices_q2", "prices_", "price", "salaries", 1, True, None])
_constraint = st.one_of(
    st.builds(lambda v: {"equals": v}, _values),
    st.builds(lambda vs: {"in": vs}, st.lists(_values, min_size=1, max_size=3)),
    st.builds(lambda p: {"prefix": p}, st.sampled_from(["p", "prices_", "prices_q", "s"])),
    st.builds(lambda p: {"pattern": p}, st.sampled_from(["prices_.*", "[a-z_0-9]+"])),
)
_tool = st.builds(
    lambda name, args, calls: {"name": name, "arguments": args, "max_calls": calls},
    st.sampled_from(["query", "q*", "*", "list_*", "list_tables"]),
    st.dictionaries(st.sampled_from(["/table", "/x"]), _constraint, max_size=2),
    st.none() | st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_tool, max_size=3),
    st.lists(_tool, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["query", "qx", "list_tables", "drop"]),
            st.fixed_dictionaries({}, optional={"table": _values, "x": _values}),
        ),
        max_size=12,
    ),
)
def test_no_accepted_child_allows_a_call_its_parent_refuses(
    parent_tools: list[dict[str, Any]], child_tools: list[dict[str, Any]], calls: list[tuple[str, dict[str, Any]]]
) -> None:
    parent = AgentProtocolSpec.model_validate({"protocol": "mcp", "tools": parent_tools})
    child = AgentProtocolSpec.model_validate({"protocol": "mcp", "tools": child_tools})
    if protocol_within(child, parent) is not None:
        return
    p, c = compile_protocol(parent, "p"), compile_protocol(child, "c")
    assert p is not None and c is not None
    for name, arguments in calls:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
        ).encode()
        kwargs: dict[str, Any] = {
            "http_method": "POST",
            "headers": {"content-type": "application/json"},
            "body": body,
            "cap": 4096,
        }
        if judge(c, **kwargs).refusal is None:
            assert judge(p, **kwargs).refusal is None, (name, arguments)


def _tools_result(*names: str, rid: int = 2) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "result": {"tools": [{"name": n, "inputSchema": {}} for n in names], "nextCursor": "c"},
    }


def allowed(name: str) -> bool:
    return name in ("query", "list_tables")


def test_filter_json() -> None:
    out = filter_tools_list(
        json.dumps(_tools_result("query", "drop_table", "list_tables")).encode(), "application/json", allowed
    )
    assert (out.shown, out.hidden) == (2, 1)
    parsed = json.loads(out.body)
    assert [t["name"] for t in parsed["result"]["tools"]] == ["query", "list_tables"]
    assert parsed["result"]["nextCursor"] == "c" and parsed["id"] == 2
    untouched = json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"content": []}}).encode()
    assert filter_tools_list(untouched, "application/json", allowed).body is untouched
    batch = json.dumps([_tools_result("drop_table"), {"jsonrpc": "2.0", "method": "n"}]).encode()
    assert json.loads(filter_tools_list(batch, "application/json", allowed).body)[0]["result"]["tools"] == []
    with pytest.raises(FilterError):
        filter_tools_list(b"{nope", "application/json", allowed)
    with pytest.raises(FilterError):
        filter_tools_list(b"<html>", "text/html", allowed)


def test_filter_sse() -> None:
    note = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n'
    tools = json.dumps(_tools_result("query", "drop_table"))
    cut = tools.index(",") + 1
    multi = "data: " + tools[:cut] + "\ndata: " + tools[cut:]  # one message over two data lines
    body = note + b": a comment\n" + b"id: 7\nevent: message\n" + multi.encode() + b"\n\n"
    out = filter_tools_list(body, "text/event-stream; charset=utf-8", allowed)
    assert (out.shown, out.hidden) == (1, 1)
    assert out.body.startswith(note)
    events = out.body[len(note) :].decode().split("\n\n")
    assert events[1] == ""
    lines = events[0].split("\n")
    assert lines[:2] == ["id: 7", "event: message"] and lines[2].startswith("data: ")
    assert [t["name"] for t in json.loads(lines[2][6:])["result"]["tools"]] == ["query"]
    plain = note + note
    assert filter_tools_list(plain, "text/event-stream", allowed).body is plain
    unterminated = b"data: " + tools.encode()
    assert b"drop_table" not in filter_tools_list(unterminated, "text/event-stream", allowed).body
    with pytest.raises(FilterError):
        filter_tools_list(b"data: \xff\n\n", "text/event-stream", allowed)
    with pytest.raises(FilterError):  # data a client might read and we cannot: refused, not passed on
        filter_tools_list(b'data: {"jsonrpc":"2.0",\ndata: "id":1}x\n\n', "text/event-stream", allowed)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["query", "drop_table", "list_tables", "x"]), max_size=6),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
)
def test_filter_never_leaks(names: list[str], newline: str, sse: bool) -> None:
    message = json.dumps(_tools_result(*names))
    body = (f"event: message{newline}data: {message}{newline}{newline}" if sse else message).encode()
    out = filter_tools_list(body, "text/event-stream" if sse else "application/json", allowed)
    for hidden in ("drop_table", '"x"'):
        assert hidden not in out.body.decode()
    assert out.shown == sum(allowed(n) for n in names)


def test_digest_and_recorded_arguments() -> None:
    assert arguments_digest({"b": 1, "a": [1, "é"]}) == arguments_digest(json.loads('{ "a" : [1,"é"], "b":1 }'))
    assert arguments_digest({"a": 1}) != arguments_digest({"a": "1"})
    recorded = recorded_arguments({"t": "x" * 300, "o": {"k": 1}, "n": 3}, ["/t", "/o", "/n", "/missing"])
    assert recorded["/t"] == "x" * 256 + "…" and recorded["/o"].startswith("sha256:") and recorded["/n"] == 3
    assert "/missing" not in recorded
    assert json.loads(error_body(4, "x")) == {"jsonrpc": "2.0", "id": 4, "error": {"code": -32603, "message": "x"}}
