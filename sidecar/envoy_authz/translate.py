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

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from sidecar import wire
from sidecar.decision import AuthzRequest, Decision, Direction, Interception, Protocol, Reason, RpcRoute
from sidecar.errors import BadRequestError

__all__ = ["build_check_response", "parse_check_request"]

_NETWORK_PROTOCOLS = {Protocol.TLS.value: Protocol.TLS, Protocol.TCP.value: Protocol.TCP}

_MAX_REQUEST_BYTES = 96 * 1024
"""Envoy caps request headers at 60 KiB by default; a CheckRequest much larger than that, not
counting a buffered body, is not a request we judge."""
_MAX_BODY_BYTES = (1 << 20) + 1
"""The largest buffered body: ``envoy.rpc_body_cap`` (at most 1 MiB) plus the byte Envoy buffers more."""
# JSON-RPC error codes of a deny on an MCP/A2A route: MCP's HeaderMismatch (-32020, 2026-07-28),
# JSON-RPC's Invalid Request for a body that cannot be judged, and -32030 (in the JSON-RPC server
# range, unused by MCP) for a call the task does not allow.
_RPC_ERROR_CODES = {
    Reason.MCP_HEADER_MISMATCH: -32020,
    Reason.MCP_AMBIGUOUS_BODY: -32600,
    Reason.MCP_INVALID_BODY: -32600,
    Reason.MCP_BODY_TOO_LARGE: -32600,
}
_RPC_DENIED = -32030
_NO_RPC_METHODS = ("GET", "DELETE", "HEAD", "OPTIONS")
_RPC_PROTOCOLS = frozenset({"mcp", "a2a"})
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")  # RFC 9110 §9.1 token
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_DIRECTIONS = {d.value: d for d in (Direction.EGRESS, Direction.INGRESS)}  # a route never asks as "control"
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


def _interception(context: Mapping[str, str]) -> Interception | None:
    """The ``intercept`` (``host:port``) and ``upstream_verify`` context extensions, typed.

    Raises:
        BadRequestError: ``intercept`` is not ``host:port`` (only a broken bootstrap sends that).
    """
    target = context.get(wire.CONTEXT_INTERCEPT)
    if target is None:
        return None
    host, _, port = target.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequestError("context_extensions.intercept must be host:port")
    return Interception(host, int(port), context.get(wire.CONTEXT_UPSTREAM_VERIFY, ""))


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
    if not _METHOD.match(http.method):
        raise BadRequestError("missing or malformed HTTP method")
    context = attributes.context_extensions
    direction = _DIRECTIONS.get(context.get(wire.CONTEXT_DIRECTION, ""))
    if direction is None:
        raise BadRequestError("context_extensions.direction must be 'egress' or 'ingress'")
    rpc = _rpc_route(context)
    interception = _interception(context)
    plain_cap = _cap(context.get(wire.CONTEXT_BODY_CAP, "")) if rpc is None else 0
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
        upstream_tls=context.get(wire.CONTEXT_UPSTREAM_TLS) == wire.ORIGINATE,
        # set by Envoy (and only there) on the intercepting chains; elsewhere an agent could send it
        connect=http.headers.get(wire.CONNECT_AUTHORITY_HEADER, "")[:300] if interception is not None else "",
        rpc=rpc,
        body=(http.raw_body or http.body.encode()) if (rpc is not None and rpc.body_cap) or plain_cap else None,
        body_cap=plain_cap,
    )


def _cap(text: str) -> int:
    """A body cap context extension: a positive decimal, else 0 (no body read)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def _rpc_route(context: Mapping[str, str]) -> RpcRoute | None:
    """The ``rpc_protocol`` and ``rpc_body_cap`` context extensions, typed (a cap that is not a
    positive decimal counts as none: the route's body is then not read).

    Raises:
        BadRequestError: ``rpc_protocol`` is neither ``mcp`` nor ``a2a`` (only a broken bootstrap
            sends that).
    """
    protocol = context.get(wire.CONTEXT_RPC_PROTOCOL)
    if protocol is None:
        return None
    if protocol not in _RPC_PROTOCOLS:
        raise BadRequestError("context_extensions.rpc_protocol must be 'mcp' or 'a2a'")
    cap = context.get(wire.CONTEXT_RPC_BODY_CAP, "")
    return RpcRoute(protocol, int(cap) if cap.isascii() and cap.isdigit() else 0)


def _add_headers(target: Any, headers: Iterable[tuple[str, str]]) -> None:
    """Append overwriting ``HeaderValueOption`` s (field by field: ~2x faster than building messages)."""
    for key, value in headers:
        option = target.add()
        option.header.key = key
        option.header.value = value
        option.append_action = _OVERWRITE


def _deny_fields(decision: Decision) -> dict[str, object]:
    """What a deny body says besides the id and reason: ``approval_id`` (an approval now waits for
    this call), ``remaining`` (calls left under the budget, on ``budget_exhausted``)."""
    extra: dict[str, object] = {}
    if decision.approval is not None:
        extra["approval_id"] = decision.approval.get("id")
    if decision.remaining is not None:
        extra["remaining"] = decision.remaining
    return extra


def _deny_body(decision: Decision) -> str:
    reason = decision.reason.value
    if not decision.rpc_protocol or decision.method in _NO_RPC_METHODS:
        return orjson.dumps({"decision_id": decision.decision_id, "reason": reason, **_deny_fields(decision)}).decode()
    error = {
        "code": _RPC_ERROR_CODES.get(decision.reason, _RPC_DENIED),
        "message": f"agent-authz: {reason}",
        "data": {
            "decision_id": decision.decision_id,
            "reason": reason,
            "detail": decision.detail,
            **_deny_fields(decision),
        },
    }
    return orjson.dumps({"jsonrpc": "2.0", "id": decision.rpc_id, "error": error}).decode()


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
        denied.body = _deny_body(decision)
    data: bytes = response.SerializeToString()
    return data
