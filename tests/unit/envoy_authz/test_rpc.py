"""The protocol edge of agent-protocol rules: CheckRequest bodies and the MCP/A2A route context as
typed fields, JSON-RPC deny bodies and the list-filter metadata."""

from __future__ import annotations

import json

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.decision import Decision, Reason, RpcRoute
from sidecar.envoy_authz.translate import build_check_response, parse_check_request
from sidecar.errors import BadRequestError


def _check(body: bytes, context: dict[str, str]) -> bytes:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path, http.scheme = "POST", "mcp.internal", "/mcp", "http"
    http.raw_body = body
    request.attributes.context_extensions.update({"direction": "egress", **context})
    return request.SerializeToString()


def test_body_only_from_buffering_routes() -> None:
    parsed = parse_check_request(_check(b"\xff\x00{}", {"rpc_protocol": "mcp", "rpc_body_cap": "1024"}))
    assert (parsed.body, parsed.rpc) == (b"\xff\x00{}", RpcRoute("mcp", 1024))  # raw bytes, as sent
    unbuffered = parse_check_request(_check(b"{}", {"rpc_protocol": "mcp"}))
    assert (unbuffered.body, unbuffered.rpc) == (None, RpcRoute("mcp", 0))
    plain = parse_check_request(_check(b"{}", {"rpc_body_cap": "1024"}))  # no MCP/A2A route: no body
    assert (plain.body, plain.rpc) == (None, None)
    for odd in ("-1", "1e3", "\u0663", ""):  # not a decimal: buffered or not, the body is not read
        assert parse_check_request(_check(b"{}", {"rpc_protocol": "a2a", "rpc_body_cap": odd})).body is None


@pytest.mark.parametrize("protocol", ["", "MCP", "grpc"])
def test_an_unknown_rpc_protocol_is_a_bad_request(protocol: str) -> None:
    with pytest.raises(BadRequestError, match="rpc_protocol"):
        parse_check_request(_check(b"{}", {"rpc_protocol": protocol, "rpc_body_cap": "1024"}))


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
