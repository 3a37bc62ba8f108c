"""The Envoy-facing side of agent-protocol rules: the rendered routes, CheckRequest bodies, JSON-RPC
deny bodies, the list-filter metadata, and the ext_proc service over real gRPC."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from sidecar.bootstrap.render import render_envoy
from sidecar.config.loader import load_config
from sidecar.decision import Decision, Reason
from sidecar.envoy_authz.ext_proc import EXT_PROC_SERVICE, ListFilterService
from sidecar.envoy_authz.translate import build_check_response, parse_check_request
from tests.conftest import base_config, task, write_config, write_keys

MCP_RULE = {"host": "mcp.internal", "protocol": "mcp", "paths": ["/mcp"], "tools": ["query"]}
PLAIN_RULE = {"host": "api.internal", "methods": ["GET"], "paths": ["/v1/*"]}


def _bootstrap(tmp_path: Path, rules: list[dict[str, Any]], **envoy: Any) -> dict[str, Any]:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=rules)], {"mcp.internal": "127.0.0.1:1", "api.internal": "127.0.0.1:2"})
    config["envoy"].update(envoy)
    return render_envoy(load_config(write_config(tmp_path, config))).bootstrap


def _egress(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = next(x for x in bootstrap["staticResources"]["listeners"] if x["name"] == "egress_http")
    return listener["filterChains"][0]["filters"][0]["typedConfig"]


def test_only_mcp_routes_buffer_and_run_ext_proc(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [MCP_RULE, PLAIN_RULE], rpc_body_cap="2KiB"))
    filters = {f["name"]: f for f in manager["httpFilters"]}
    authz = filters["envoy.filters.http.ext_authz"]["typedConfig"]
    assert authz["withRequestBody"] == {"maxRequestBytes": 2049, "allowPartialMessage": True, "packAsBytes": True}
    ext_proc = filters["envoy.filters.http.ext_proc"]
    assert ext_proc["disabled"] is True
    assert ext_proc["typedConfig"]["extensionConfig"]["typedConfig"]["processingMode"]["responseBodyMode"] == "BUFFERED"
    vhosts = {v["name"]: v for v in manager["routeConfig"]["virtualHosts"]}
    mcp_route = vhosts["rpc|dest|mcp.internal"]["routes"][-1]
    check = mcp_route["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
    assert check["contextExtensions"] == {"direction": "egress", "rpc_protocol": "mcp", "rpc_body_cap": "2048"}
    assert check["withRequestBody"]["maxRequestBytes"] == 2049
    assert "envoy.filters.http.ext_proc" in mcp_route["typedPerFilterConfig"]
    assert mcp_route["requestHeadersToRemove"] == ["x-agent-authz-list-filter"]
    for name, vhost in vhosts.items():
        if name.startswith("rpc|") or "routes" not in vhost:
            continue
        per_filter = vhost.get("typedPerFilterConfig", {}).get("envoy.filters.http.ext_authz")
        if per_filter is not None and "checkSettings" in per_filter:
            assert per_filter["checkSettings"]["disableRequestBodyBuffering"] is True, name


def test_header_decision_route_first(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [MCP_RULE], mcp_header_decisions=["mcp.internal"]))
    routes = next(v for v in manager["routeConfig"]["virtualHosts"] if v["name"] == "rpc|dest|mcp.internal")["routes"]
    assert routes[0]["match"]["headers"] == [{"name": "mcp-method", "presentMatch": True}]
    first = routes[0]["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
    assert first["disableRequestBodyBuffering"] is True and "rpc_body_cap" not in first["contextExtensions"]


def test_without_agent_protocol_rules_nothing_changes(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [PLAIN_RULE]))
    names = [f["name"] for f in manager["httpFilters"]]
    assert "envoy.filters.http.ext_proc" not in names
    authz = next(f for f in manager["httpFilters"] if f["name"] == "envoy.filters.http.ext_authz")["typedConfig"]
    assert "withRequestBody" not in authz
    assert "x-agent-authz" not in json.dumps(manager["routeConfig"]).replace("x-agent-authz-", "")


def _check(body: bytes, context: dict[str, str]) -> bytes:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path, http.scheme = "POST", "mcp.internal", "/mcp", "http"
    http.raw_body = body
    request.attributes.context_extensions.update({"direction": "egress", **context})
    return request.SerializeToString()


def test_body_only_from_buffering_routes() -> None:
    parsed = parse_check_request(_check(b"\xff\x00{}", {"rpc_protocol": "mcp", "rpc_body_cap": "1024"}))
    assert (parsed.body, parsed.body_cap) == (b"\xff\x00{}", 1024)  # raw bytes, as sent
    unbuffered = parse_check_request(_check(b"{}", {"rpc_protocol": "mcp"}))
    assert (unbuffered.body, unbuffered.body_cap) == (None, 0)


def _response(decision: Decision) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(build_check_response(decision))


def test_deny_bodies_and_list_metadata() -> None:
    mismatch = Decision(
        False,
        Reason.MCP_HEADER_MISMATCH,
        400,
        "d1",
        "Mcp-Name does not match",
        method="POST",
        rpc_protocol="mcp",
        rpc_id=7,
    )
    body = json.loads(_response(mismatch).denied_response.body)
    assert body == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {
            "code": -32020,
            "message": "agent-authz: mcp_header_mismatch",
            "data": {"decision_id": "d1", "reason": "mcp_header_mismatch", "detail": "Mcp-Name does not match"},
        },
    }
    tool = Decision(False, Reason.TOOL_NOT_ALLOWED, 403, "d2", method="POST", rpc_protocol="mcp")
    assert json.loads(_response(tool).denied_response.body)["error"]["code"] == -32030
    plain = Decision(False, Reason.PATH_NOT_ALLOWED, 403, "d3", method="GET")
    assert json.loads(_response(plain).denied_response.body) == {"decision_id": "d3", "reason": "path_not_allowed"}
    listing = _response(Decision(True, Reason.ALLOWED, 200, "d4", list_filter=("query", "list_*")))
    values = listing.dynamic_metadata.fields["mcp_list_filter"].list_value.values
    assert [v.string_value for v in values] == ["query", "list_*"]
    empty = _response(Decision(True, Reason.ALLOWED, 200, "d5", list_filter=()))
    assert "mcp_list_filter" in empty.dynamic_metadata.fields  # present: show nothing, not everything


def _stream(*messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    async def run() -> list[ep.ProcessingResponse]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((ListFilterService().handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(
                    f"/{EXT_PROC_SERVICE}/Process",
                    request_serializer=ep.ProcessingRequest.SerializeToString,
                    response_deserializer=ep.ProcessingResponse.FromString,
                )
                return [r async for r in call(iter(messages), timeout=5)]
        finally:
            await server.stop(None)

    return asyncio.run(run())


def _headers(content_type: str, patterns: list[str] | None, encoding: str = "") -> ep.ProcessingRequest:
    request = ep.ProcessingRequest()
    for key, value in (("content-type", content_type), ("content-length", "99"), ("content-encoding", encoding)):
        if value:
            header = request.response_headers.headers.headers.add()
            header.key, header.raw_value = key, value.encode()
    if patterns is not None:
        fields = request.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].fields
        fields["mcp_list_filter"].list_value.SetInParent()
        for pattern in patterns:
            fields["mcp_list_filter"].list_value.values.add().string_value = pattern
    return request


def _body(data: bytes) -> ep.ProcessingRequest:
    request = ep.ProcessingRequest()
    request.response_body.body, request.response_body.end_of_stream = data, True
    return request


LIST = json.dumps(
    {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "query"}, {"name": "drop_table"}]}}
).encode()


def test_ext_proc_filters_and_fails_closed() -> None:
    head, body = _stream(_headers("application/json", ["query"]), _body(LIST))
    assert list(head.response_headers.response.header_mutation.remove_headers) == ["content-length"]
    assert [t["name"] for t in json.loads(body.response_body.response.body_mutation.body)["result"]["tools"]] == [
        "query"
    ]
    nothing = _stream(_headers("application/json", []), _body(LIST))[1]
    assert json.loads(nothing.response_body.response.body_mutation.body)["result"]["tools"] == []
    passed = _stream(_headers("application/json", None))[0]  # no metadata: body processing switched off
    assert passed.HasField("mode_override") and passed.mode_override.response_body_mode == 0  # BodySendMode.NONE
    for request in (_headers("application/json", ["query"], "gzip"), _headers("text/html", ["query"])):
        failed = _stream(request, _body(LIST))[1].response_body.response
        error = json.loads(failed.body_mutation.body)
        assert error["error"]["code"] == -32603 and b"drop_table" not in failed.body_mutation.body
        assert [(h.header.key, h.header.raw_value) for h in failed.header_mutation.set_headers] == [
            ("content-type", b"application/json")
        ]
