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
* a ``CONNECT`` arrives as an HTTP check with ``method: CONNECT``, ``host`` the ``host:port`` it
  names and an empty ``path``;
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

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from sidecar import wire
from sidecar.decision import AuthzRequest, Decision, Direction, Protocol
from sidecar.envoy_authz.context import METHOD, deny_body, route_context
from sidecar.errors import BadRequestError

__all__ = ["build_check_response", "parse_check_request"]

_NETWORK_PROTOCOLS = {Protocol.TLS.value: Protocol.TLS, Protocol.TCP.value: Protocol.TCP}

_MAX_REQUEST_BYTES = 96 * 1024
"""Envoy caps request headers at 60 KiB by default; a CheckRequest much larger than that, not
counting a buffered body, is not a request we judge."""
_MAX_BODY_BYTES = (1 << 20) + 1
"""The largest buffered body: ``envoy.rpc_body_cap`` (at most 1 MiB) plus the byte Envoy buffers more."""
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
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
    protocol = _NETWORK_PROTOCOLS.get(metadata.get(wire.PROTOCOL_METADATA, ""))
    if protocol is None or metadata.get(wire.DIRECTION_METADATA) != Direction.EGRESS.value:
        raise BadRequestError("CheckRequest has no HTTP attributes")
    return AuthzRequest(
        direction=Direction.EGRESS,
        method="",
        scheme="",
        authority="",
        path="",
        headers={},
        protocol=protocol,
        sni=attributes.tls_session.sni,
        destination=_address(attributes.destination),
        via_connect=metadata.get(wire.VIA_METADATA) == wire.CONNECT_VIA,
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
        BadRequestError: not a CheckRequest, over 96 KiB besides a buffered body (or over 96 KiB
            plus the largest body cap in all), no HTTP attributes and no network check metadata,
            no usable ``direction`` context extension, or a malformed ``intercept`` or
            ``rpc_protocol`` one.
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
    if not METHOD.fullmatch(http.method):
        raise BadRequestError("missing or malformed HTTP method")
    direction, interception, upstream_tls, rpc, plain_cap = route_context(attributes.context_extensions)
    return AuthzRequest(
        direction=direction,
        method=http.method,
        scheme=http.scheme,
        authority=http.host,
        path=http.path,
        headers=http.headers,  # the protobuf map itself: read-only use, no copy
        request_id=http.headers.get("x-request-id", http.id),
        peer_certificate=attributes.source.certificate,
        destination=_address(attributes.destination),
        interception=interception,
        upstream_tls=upstream_tls,
        # set by Envoy (and only there) on the intercepting chains; elsewhere an agent could send it
        connect=http.headers.get(wire.CONNECT_AUTHORITY_HEADER, "")[:300] if interception is not None else "",
        rpc=rpc,
        body=(http.raw_body or http.body.encode()) if (rpc is not None and rpc.body_cap) or plain_cap else None,
        body_cap=plain_cap,
    )


def _add_headers(target: Any, headers: Iterable[tuple[str, str]]) -> None:
    """Append overwriting ``HeaderValueOption`` s (field by field: ~2x faster than building messages)."""
    for key, value in headers:
        option = target.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _OVERWRITE


def build_check_response(decision: Decision) -> bytes:
    """Serialize the ``CheckResponse`` for ``decision``.

    Allow: ``OkHttpResponse`` overwriting ``headers_to_set``, removing ``headers_to_remove`` and
    adding ``x-agent-authz-decision-id`` (and, under a budget, ``x-agent-authz-remaining``) to the
    response. Deny: ``DeniedHttpResponse`` with the decision's status and the JSON body
    ``{"decision_id", "reason"}`` (plus ``approval_id`` when an approval waits for the call,
    ``remaining`` on ``budget_exhausted``) - on an MCP/A2A route a JSON-RPC error ``{"jsonrpc": "2.0",
    "id", "error": {"code", "message", "data": {"decision_id", "reason", "detail", ...}}}``. Both
    carry dynamic metadata (``decision_id``, ``decision``, ``reason``, ``task_id``; for an allowed MCP
    ``tools/list`` also ``mcp_list_filter``).
    """
    response = external_auth_pb2.CheckResponse()
    fields = response.dynamic_metadata.fields
    fields[wire.METADATA_DECISION_ID].string_value = decision.decision_id
    fields[wire.METADATA_DECISION].string_value = "allow" if decision.allow else "deny"
    fields[wire.METADATA_REASON].string_value = decision.reason.value
    fields[wire.METADATA_TASK_ID].string_value = decision.task_id or ""
    if decision.list_filter is not None:
        listed = fields[wire.METADATA_LIST_FILTER].list_value
        listed.SetInParent()  # present even when no tool may be shown
        for pattern in decision.list_filter:
            listed.values.add().string_value = pattern
    if decision.allow:
        response.status.CopyFrom(_OK)
        ok = response.ok_response
        _add_headers(ok.headers, decision.headers_to_set)
        ok.headers_to_remove.extend(decision.headers_to_remove)
        added = [(wire.DECISION_ID_HEADER, decision.decision_id)]
        if decision.remaining is not None:
            added.append((wire.REMAINING_HEADER, str(decision.remaining)))
        _add_headers(ok.response_headers_to_add, added)
    else:
        response.status.CopyFrom(_DENIED)
        denied = response.denied_response
        denied.status.code = decision.http_status
        _add_headers(
            denied.headers,
            (
                ("content-type", "application/json"),
                (wire.DECISION_ID_HEADER, decision.decision_id),
                (wire.REASON_HEADER, decision.reason.value),
            ),
        )
        denied.body = deny_body(decision)
    data: bytes = response.SerializeToString()
    return data
