"""The ext_proc service filtering ``tools/list`` responses, over real gRPC: filtered to the allowed
tools, passed untouched without list-filter metadata, replaced by a JSON-RPC error when it cannot be
filtered."""

from __future__ import annotations

import asyncio
import json

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from sidecar.envoy_authz.ext_proc import EXT_PROC_SERVICE, ListFilterService


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
