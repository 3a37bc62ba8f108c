"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: ``tools/list`` responses filtered to the task.

ext_authz decides requests and cannot change a response body, so MCP routes also run Envoy's
``ext_proc`` filter (``envoy.filters.http.ext_proc``) against this service, served by the same
gRPC server and socket as the authorization service. The filter runs only on the response of a
request ext_authz marked (``x-agent-authz-list-filter: 1``, an allowed ``tools/list``; Envoy's
``match_delegate`` skips it otherwise). Envoy skips the request, sends the response headers,
buffers the response body (``BUFFERED``) and forwards the ext_authz dynamic metadata
(``metadata_options.forwarding_namespaces``; ``mcp_list_filter`` is a list from gRPC checks, a JSON
array in a string from HTTP checks), so each filtered response is one stream:

1. ``response_headers``: without ``mcp_list_filter`` in the metadata (not an allowed
   ``tools/list`` - cannot happen through the rendered routes, but a stream is never trusted to be
   one) the answer switches the body off (``mode_override: response_body_mode NONE``,
   ``allow_mode_override``) and the response passes untouched. Otherwise ``content-length`` is
   removed (the filtered body is shorter; Envoy sends it chunked) and the body is awaited.
2. ``response_body`` (whole, ``end_of_stream``): :func:`sidecar.agentproto.listfilter.filter_tools_list`
   with the task's tool patterns. A body that cannot be filtered (encoded, not JSON, not an event
   stream) is replaced by a JSON-RPC error (``-32603``): the agent never sees an unfiltered list.

Any other message is answered with an empty response of its kind. Envoy's ``failure_mode_allow:
false`` turns a broken stream into a 500 (fail closed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf.message import DecodeError

from sidecar.agentproto.listfilter import FilterError, error_body, filter_tools_list
from sidecar.agentproto.names import NameSet
from sidecar.wire import METADATA_LIST_FILTER, METADATA_NAMESPACE

__all__ = ["EXT_PROC_SERVICE", "ListFilterService"]

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_log = structlog.get_logger("agent_authz.ext_proc")
_NO_BODY = processing_mode_pb2.ProcessingMode.NONE


def _allowed_names(request: Any) -> NameSet | None:
    """The tool patterns of ``mcp_list_filter``: a list (gRPC checks) or a string holding a JSON
    array of strings (HTTP checks: dynamic metadata from answer headers is a string). Anything
    else filters everything out."""
    namespace = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if namespace is None or METADATA_LIST_FILTER not in namespace.fields:
        return None
    value = namespace.fields[METADATA_LIST_FILTER]
    if value.WhichOneof("kind") == "string_value":
        try:
            listed = orjson.loads(value.string_value)
        except orjson.JSONDecodeError:
            listed = []
        names = listed if isinstance(listed, list) else []
        return NameSet.compile(n for n in names if isinstance(n, str) and n)
    return NameSet.compile(v.string_value for v in value.list_value.values if v.string_value)


def _header(headers: Any, name: str) -> str:
    for header in headers.headers:
        if header.key == name:
            raw: bytes = header.raw_value or header.value.encode()
            return raw.decode("latin-1")
    return ""


class ListFilterService:
    """The ext_proc service (one instance per sidecar; no state between streams).

    Attributes:
        filtered / hidden: responses filtered and tools removed so far (for tests and metrics).
    """

    def __init__(self) -> None:
        self.filtered = 0
        self.hidden = 0

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to the gRPC server (raw bytes in and out)."""
        return grpc.method_handlers_generic_handler(
            EXT_PROC_SERVICE, {"Process": grpc.stream_stream_rpc_method_handler(self._process)}
        )

    async def _process(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        allowed: NameSet | None = None
        content_type = encoding = ""
        async for raw in requests:
            try:
                request = ep.ProcessingRequest.FromString(raw)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "undecodable ProcessingRequest")
                return
            kind = request.WhichOneof("request")
            response = ep.ProcessingResponse()
            if kind == "response_headers":
                allowed = _allowed_names(request)
                headers = request.response_headers.headers
                content_type, encoding = _header(headers, "content-type"), _header(headers, "content-encoding")
                if allowed is None:
                    response.response_headers.SetInParent()
                    response.mode_override.response_body_mode = _NO_BODY
                else:
                    response.response_headers.response.header_mutation.remove_headers.append("content-length")
            elif kind == "response_body":
                body, ok = request.response_body.body, True
                if allowed is not None:
                    body, ok = self._filter(body, content_type, encoding, allowed)
                common = response.response_body.response
                common.body_mutation.body = body
                if not ok:  # the headers are still held (BUFFERED): the error goes out as JSON
                    option = common.header_mutation.set_headers.add()
                    option.header.key, option.header.raw_value = "content-type", b"application/json"
                    common.header_mutation.remove_headers.append("content-encoding")
            elif kind == "request_headers":
                response.request_headers.SetInParent()
            elif kind == "request_body":
                response.request_body.SetInParent()
            elif kind == "request_trailers":
                response.request_trailers.SetInParent()
            elif kind == "response_trailers":
                response.response_trailers.SetInParent()
            yield response.SerializeToString()

    def _filter(self, body: bytes, content_type: str, encoding: str, allowed: NameSet) -> tuple[bytes, bool]:
        """``(body to send, whether it is the filtered list)``."""
        try:
            if encoding.strip().lower() not in ("", "identity"):
                raise FilterError(f"the response is {encoding}-encoded")
            result = filter_tools_list(body, content_type, allowed.matches)
        except FilterError as exc:
            _log.warning("tools_list_unfilterable", code=exc.code.value, error=str(exc))
            return error_body(None, f"agent-authz could not filter tools/list: {exc}"), False
        self.filtered += 1
        self.hidden += result.hidden
        return result.body, True
