"""CheckRequest -> :class:`AuthzRequest` and :class:`Decision` -> CheckResponse.

This is the only module that reads or builds ``envoy.service.auth.v3`` messages. It uses the upb
protobuf classes of ``xds-protos`` (parsing a 1.5 KB CheckRequest: ~0.8 µs, against ~126 µs with
betterproto2 classes). Envoy facts relied on (``envoy.service.auth.v3``):

* ``attributes.request.http.path`` includes the query string; header keys are lower case and
  duplicate headers arrive comma-joined;
* ``attributes.source.certificate`` is the URL-encoded PEM of the peer, sent only with
  ``include_peer_certificate``;
* an OkHttpResponse header with ``append_action: OVERWRITE_IF_EXISTS_OR_ADD`` replaces the
  request's value;
* the network filter (``envoy.filters.network.ext_authz``) sends no ``request.http`` and has no
  ``context_extensions``: the listener names the check's direction and protocol in gRPC initial
  metadata (``x-agent-authz-direction``, ``x-agent-authz-protocol``); with ``include_tls_session``
  it sends ``tls_session`` (``sni`` empty when the ClientHello named none, and also for non-TLS
  connections); ``destination.address`` is the connection's local address, which the
  ``original_dst`` listener filter restores to the original destination;
* on routes that buffer the body (``with_request_body`` with ``pack_as_bytes``), the bytes arrive
  unchanged in ``raw_body``: only the first ``max_request_bytes`` of them when the body is longer
  (``allow_partial_message: true``), so a body over the cap is seen as longer than the cap;
* a deny's body can be any bytes with any headers and status: on MCP/A2A routes it is a JSON-RPC
  2.0 error object (``id`` the request's when the body was read, else ``null``), which MCP clients
  surface as the call's error. It cannot be an event stream or several messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from sidecar.decision import DECISION_ID_HEADER, REASON_HEADER, AuthzRequest, Decision, Direction, Protocol
from sidecar.errors import BadRequestError

__all__ = [
    "DECISION_ID_HEADER",
    "DIRECTION_METADATA",
    "LIST_FILTER_METADATA",
    "METADATA_NAMESPACE",
    "PROTOCOL_METADATA",
    "REASON_HEADER",
    "VIA_METADATA",
    "build_check_response",
    "parse_check_request",
]

DIRECTION_METADATA = "x-agent-authz-direction"
"""gRPC metadata key: the direction of a network (connection-level) check."""
PROTOCOL_METADATA = "x-agent-authz-protocol"
"""gRPC metadata key: ``tls`` or ``tcp``, the filter chain that asks (network checks only)."""
VIA_METADATA = "x-agent-authz-via"
"""gRPC metadata key: ``connect`` when the connection arrived through a proxy ``CONNECT`` tunnel
(the internal listener behind ``egress_http``), so it has no original destination."""
_NETWORK_PROTOCOLS = {Protocol.TLS.value: Protocol.TLS, Protocol.TCP.value: Protocol.TCP}

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
"""Envoy stores ``CheckResponse.dynamic_metadata`` under the filter's name; access logs read
``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%``."""

LIST_FILTER_METADATA = "mcp_list_filter"
"""Dynamic metadata key (ext_authz namespace) of an allowed MCP ``tools/list``: the tool name
patterns its response is filtered to; Envoy's ext_proc filter forwards it to the sidecar
(``metadata_options.forwarding_namespaces``)."""

_MAX_REQUEST_BYTES = 96 * 1024
"""Envoy caps request headers at 60 KiB by default; a CheckRequest much larger than that, not
counting a buffered body, is not a request we judge."""
_MAX_BODY_BYTES = (1 << 20) + 1
"""The largest buffered body: ``envoy.rpc_body_cap`` (at most 1 MiB) plus the byte Envoy buffers more."""
_RPC_BODY_CAP = "rpc_body_cap"
# JSON-RPC error codes of a deny on an MCP/A2A route: MCP's HeaderMismatch (-32020, 2026-07-28),
# JSON-RPC's Invalid Request for a body that cannot be judged, and -32030 (in the JSON-RPC server
# range, unused by MCP) for a call the task does not allow.
_RPC_ERROR_CODES = {
    "mcp_header_mismatch": -32020,
    "mcp_ambiguous_body": -32600,
    "mcp_invalid_body": -32600,
    "mcp_body_too_large": -32600,
}
RPC_DENIED = -32030
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")  # RFC 9110 §9.1 token
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_DIRECTIONS = {d.value: d for d in Direction}
_OK = status_pb2.Status(code=code_pb2.OK)
_DENIED = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)


def _address(peer: attribute_context_pb2.AttributeContext.Peer) -> str:
    if not peer.HasField("address") or not peer.address.HasField("socket_address"):
        return ""
    socket = peer.address.socket_address
    host = f"[{socket.address}]" if ":" in socket.address else socket.address
    return f"{host}:{socket.port_value}"


def _network_request(
    attributes: attribute_context_pb2.AttributeContext, metadata: Mapping[str, str] | None
) -> AuthzRequest:
    metadata = metadata or {}
    protocol = _NETWORK_PROTOCOLS.get(metadata.get(PROTOCOL_METADATA, ""))
    if protocol is None or metadata.get(DIRECTION_METADATA) != Direction.EGRESS.value:
        raise BadRequestError("CheckRequest has no HTTP attributes")
    return AuthzRequest(
        direction=Direction.EGRESS,
        method="",
        scheme="",
        authority="",
        path="",
        headers={},
        context={
            "direction": Direction.EGRESS.value,
            "protocol": protocol.value,
            "via": metadata.get(VIA_METADATA, ""),
        },
        protocol=protocol,
        sni=attributes.tls_session.sni,
        destination=_address(attributes.destination),
    )


def parse_check_request(raw: bytes, metadata: Mapping[str, str] | None = None) -> AuthzRequest:
    """Decode a serialized ``CheckRequest``.

    Args:
        raw: the gRPC request message bytes.
        metadata: the call's gRPC metadata (lower-case keys); names direction and protocol of a
            network check, which has no ``context_extensions``.

    Returns:
        The :class:`AuthzRequest`: an HTTP request, or (no HTTP attributes, and metadata naming an
        egress ``tls``/``tcp`` check) a connection with its SNI and original destination.

    Raises:
        BadRequestError: not a CheckRequest, over 96 KiB plus the largest body cap, no HTTP
            attributes and no network check
            metadata, or no usable ``direction`` context extension.
    """
    if len(raw) > _MAX_REQUEST_BYTES + _MAX_BODY_BYTES:
        raise BadRequestError("CheckRequest larger than 96 KiB plus the largest body")
    try:
        message = external_auth_pb2.CheckRequest.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BadRequestError(f"undecodable CheckRequest ({type(exc).__name__})") from None
    attributes = message.attributes
    if len(raw) - len(attributes.request.http.raw_body) - len(attributes.request.http.body) > _MAX_REQUEST_BYTES:
        raise BadRequestError("CheckRequest larger than 96 KiB without its body")
    if not attributes.request.HasField("http"):
        return _network_request(attributes, metadata)
    http = attributes.request.http
    if not _METHOD.match(http.method):
        raise BadRequestError("missing or malformed HTTP method")
    context = attributes.context_extensions
    direction = _DIRECTIONS.get(context.get("direction", ""))
    if direction is None:
        raise BadRequestError("context_extensions.direction must be 'egress' or 'ingress'")
    return AuthzRequest(
        direction=direction,
        method=http.method,
        scheme=http.scheme,
        authority=http.host,
        path=http.path,
        headers=http.headers,  # the protobuf map itself: read-only use, no copy
        request_id=http.headers.get("x-request-id", http.id),
        context=context,
        peer_certificate=attributes.source.certificate,
        destination=_address(attributes.destination),
        **_body(http, context),
    )


def _body(http: attribute_context_pb2.AttributeContext.HttpRequest, context: Mapping[str, str]) -> dict[str, Any]:
    cap = context.get(_RPC_BODY_CAP, "")
    if not cap.isdigit() or int(cap) <= 0:
        return {}
    return {"body": http.raw_body or http.body.encode(), "body_cap": int(cap)}


def _add_headers(target: Any, headers: Iterable[tuple[str, str]]) -> None:
    """Append overwriting ``HeaderValueOption`` s (field by field: ~2x faster than building messages)."""
    for key, value in headers:
        option = target.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _OVERWRITE


def _deny_body(decision: Decision) -> str:
    reason = decision.reason.value
    if not decision.rpc_protocol or decision.method in ("GET", "DELETE", "HEAD", "OPTIONS"):
        return orjson.dumps({"decision_id": decision.decision_id, "reason": reason}).decode()
    error = {
        "code": _RPC_ERROR_CODES.get(reason, RPC_DENIED),
        "message": f"agent-authz: {reason}",
        "data": {"decision_id": decision.decision_id, "reason": reason, "detail": decision.detail},
    }
    return orjson.dumps({"jsonrpc": "2.0", "id": decision.rpc_id, "error": error}).decode()


def build_check_response(decision: Decision) -> bytes:
    """Serialize the ``CheckResponse`` for ``decision``.

    Allow: ``OkHttpResponse`` overwriting ``headers_to_set``, removing ``headers_to_remove`` and
    adding ``x-agent-authz-decision-id`` to the response. Deny: ``DeniedHttpResponse`` with the
    decision's status and the JSON body ``{"decision_id", "reason"}`` - on an MCP/A2A route a
    JSON-RPC error ``{"jsonrpc": "2.0", "id", "error": {"code", "message", "data": {"decision_id",
    "reason", "detail"}}}``. Both carry dynamic metadata (``decision_id``, ``decision``, ``reason``,
    ``task_id``; for an allowed MCP ``tools/list`` also ``mcp_list_filter``).
    """
    response = external_auth_pb2.CheckResponse()
    fields = response.dynamic_metadata.fields
    fields["decision_id"].string_value = decision.decision_id
    fields["decision"].string_value = "allow" if decision.allow else "deny"
    fields["reason"].string_value = decision.reason.value
    fields["task_id"].string_value = decision.task_id or ""
    if decision.list_filter is not None:
        fields[LIST_FILTER_METADATA].list_value.SetInParent()  # present even when no tool may be shown
        for pattern in decision.list_filter:
            fields[LIST_FILTER_METADATA].list_value.values.add().string_value = pattern
    if decision.allow:
        response.status.CopyFrom(_OK)
        ok = response.ok_response
        _add_headers(ok.headers, decision.headers_to_set)
        ok.headers_to_remove.extend(decision.headers_to_remove)
        _add_headers(ok.response_headers_to_add, ((DECISION_ID_HEADER, decision.decision_id),))
    else:
        response.status.CopyFrom(_DENIED)
        denied = response.denied_response
        denied.status.code = decision.http_status
        _add_headers(
            denied.headers,
            (
                ("content-type", "application/json"),
                (DECISION_ID_HEADER, decision.decision_id),
                (REASON_HEADER, decision.reason.value),
            ),
        )
        denied.body = _deny_body(decision)
    data: bytes = response.SerializeToString()
    return data
