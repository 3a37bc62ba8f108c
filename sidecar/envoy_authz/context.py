"""What both ext_authz transports share: the route context of an HTTP check, the body of a deny.

Each route of the rendered bootstrap names its context (:mod:`sidecar.wire`): in
``check_settings.context_extensions`` for gRPC checks, and as the route's metadata (sent in
``x-agent-authz-context``) for HTTP checks. Both arrive here as a ``str -> str`` mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import orjson

from sidecar import wire
from sidecar.decision import Decision, Direction, Interception, Reason, RpcRoute
from sidecar.errors import BadRequestError

__all__ = ["METHOD", "RouteContext", "deny_body", "route_context"]

METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
"""An HTTP method (RFC 9110 §9.1: a token), at most 32 characters (use ``fullmatch``)."""
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
_DIRECTIONS = {d.value: d for d in (Direction.EGRESS, Direction.INGRESS)}  # a route never asks as "control"
_RPC_PROTOCOLS = frozenset({"mcp", "a2a"})


class RouteContext(NamedTuple):
    """What a route says about its checks."""

    direction: Direction
    interception: Interception | None
    upstream_tls: bool
    rpc: RpcRoute | None
    body_cap: int
    """On a plain-HTTP route that buffers the body (an ``approval`` host), ``body_cap``; else 0."""


def route_context(context: Mapping[str, str]) -> RouteContext:
    """Type the context keys of :mod:`sidecar.wire` (``direction``, ``intercept``,
    ``upstream_verify``, ``upstream_tls``, ``rpc_protocol``, ``rpc_body_cap``, ``body_cap``).

    A body cap that is not a positive decimal counts as none (the route's body is then not read);
    ``body_cap`` is read on plain-HTTP routes only.

    Raises:
        BadRequestError: no usable ``direction``; ``intercept`` is not ``host:port``;
            ``rpc_protocol`` is neither ``mcp`` nor ``a2a`` (only a broken bootstrap sends these).
    """
    direction = _DIRECTIONS.get(context.get(wire.CONTEXT_DIRECTION, ""))
    if direction is None:
        raise BadRequestError("context_extensions.direction must be 'egress' or 'ingress'")
    rpc = _rpc_route(context)
    return RouteContext(
        direction,
        _interception(context),
        context.get(wire.CONTEXT_UPSTREAM_TLS) == wire.ORIGINATE,
        rpc,
        _cap(context.get(wire.CONTEXT_BODY_CAP, "")) if rpc is None else 0,
    )


def _cap(text: str) -> int:
    """A body cap context extension: a positive decimal, else 0 (no body read)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


def _interception(context: Mapping[str, str]) -> Interception | None:
    target = context.get(wire.CONTEXT_INTERCEPT)
    if target is None:
        return None
    host, _, port = target.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequestError("context_extensions.intercept must be host:port")
    return Interception(host, int(port), context.get(wire.CONTEXT_UPSTREAM_VERIFY, ""))


def _rpc_route(context: Mapping[str, str]) -> RpcRoute | None:
    protocol = context.get(wire.CONTEXT_RPC_PROTOCOL)
    if protocol is None:
        return None
    if protocol not in _RPC_PROTOCOLS:
        raise BadRequestError("context_extensions.rpc_protocol must be 'mcp' or 'a2a'")
    cap = context.get(wire.CONTEXT_RPC_BODY_CAP, "")
    return RpcRoute(protocol, int(cap) if cap.isascii() and cap.isdigit() else 0)


def _deny_fields(decision: Decision) -> dict[str, object]:
    """What a deny body says besides the id and reason: ``approval_id`` (an approval now waits for
    this call), ``remaining`` (calls left under the budget, on ``budget_exhausted``)."""
    extra: dict[str, object] = {}
    if decision.approval is not None:
        extra["approval_id"] = decision.approval.get("id")
    if decision.remaining is not None:
        extra["remaining"] = decision.remaining
    return extra


def deny_body(decision: Decision) -> str:
    """The body of a deny: ``{"decision_id", "reason"}`` (plus ``approval_id`` when an approval waits
    for the call, ``remaining`` on ``budget_exhausted``), or on an MCP/A2A route (for a method that
    carries a JSON-RPC message) a JSON-RPC 2.0 error ``{"jsonrpc", "id", "error": {"code", "message",
    "data": {"decision_id", "reason", "detail", ...}}}``."""
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
