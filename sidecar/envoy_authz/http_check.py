"""HTTP checks (Envoy's HTTP ext_authz service) -> :class:`AuthzRequest`, and :class:`Decision` -> the answer.

What Envoy sends and reads (Envoy 1.40; the facts and the names are in :mod:`sidecar.wire`): the
check is the client's method, :data:`~sidecar.wire.HTTP_CHECK_PREFIX` followed by the client's
``:path`` (query included), its ``:authority`` as ``host``, its headers (lower case, duplicates
comma-joined) and, on routes that buffer it, the body. The route's context comes in
:data:`~sidecar.wire.CONTEXT_HEADER` - the client's own ``x-agent-authz-*`` headers never reach the
check (Envoy removes them before ext_authz, and the filter's ``disallowed_headers`` keeps all but
:data:`~sidecar.wire.CONNECT_AUTHORITY_HEADER`, which Envoy itself sets on the intercepting chains),
so it is always the route's - and is read like gRPC's ``context_extensions``
(:mod:`sidecar.envoy_authz.context`).

The answer: an allow is ``200`` with the headers to set (Envoy copies them onto the request,
overwriting), :data:`~sidecar.wire.HEADERS_TO_REMOVE_HEADER` and the dynamic metadata as headers;
a deny is the decision's ``4xx`` status with ``content-type``, the decision id and reason headers
and the JSON (or JSON-RPC error) body of :func:`~sidecar.envoy_authz.context.deny_body`. Only
``200`` allows, so a deny never answers ``200``: a deny status outside ``400-499`` is sent as
``403`` (a ``5xx`` would be Envoy's error path, 503 without our body). Every header name and value
written is checked first: one that could break the answer's framing (a CR or LF, a byte outside
visible ASCII) is refused, and the service answers and records an ``internal_error`` deny instead -
never a forged header.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

import orjson

from sidecar import wire
from sidecar.decision import AuthzRequest, Decision
from sidecar.envoy_authz.context import METHOD, RouteContext, deny_body, route_context
from sidecar.errors import BadRequestError

__all__ = ["MAX_HEADER_BYTES", "HttpCheck", "build_http_answer", "parse_http_check"]

MAX_HEADER_BYTES = 96 * 1024
"""The largest request line and headers of a check (Envoy caps request headers at 60 KiB by
default); a larger check is a ``bad_request`` deny, as for gRPC."""
_PREFIX = wire.HTTP_CHECK_PREFIX.encode()
_PREFIX_LEN = len(_PREFIX)
_OURS = wire.RESERVED_HEADER_PREFIX
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 §5.6.2, lower case as Envoy sends them
_VALUE = re.compile(r"[\x20-\x7e]*")  # visible ASCII and space: no CR, LF or NUL (fullmatch)
_CONTEXTS: dict[str, RouteContext] = {}
_MAX_CONTEXTS = 1024  # one per route of the bootstrap; a bound, not a cache policy
_REASON_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}


class HttpCheck:
    """One check as the HTTP server read it.

    Attributes:
        method: the request method (bytes, as parsed).
        target: the request target (``/agent-authz/check/...``).
        headers: lower-case names to values (``str``, UTF-8), duplicates comma-joined.
        body: the body, ``b""`` when none.
        problem: set by the reader when the check cannot be judged (too large, a header that is
            not UTF-8): :func:`parse_http_check` turns it into a ``bad_request``.
    """

    __slots__ = ("body", "headers", "method", "problem", "target")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: dict[str, str] = {}
        self.body = b""
        self.problem = ""


def _context(raw: str) -> RouteContext:
    """The typed route context of a :data:`~sidecar.wire.CONTEXT_HEADER` value (memoized: a
    bootstrap has one value per route)."""
    known = _CONTEXTS.get(raw)
    if known is not None:
        return known
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequestError(f"{wire.CONTEXT_HEADER} is not JSON") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise BadRequestError(f"{wire.CONTEXT_HEADER} must be an object of strings")
    context = route_context(parsed)
    if len(_CONTEXTS) < _MAX_CONTEXTS:
        _CONTEXTS[raw] = context
    return context


def parse_http_check(check: HttpCheck) -> AuthzRequest:
    """Read one HTTP check.

    Returns:
        The :class:`AuthzRequest`: ``headers`` without the ``x-agent-authz-*`` headers Envoy added,
        ``host`` as ``:authority`` and the other pseudo-headers (``:method``, ``:path``, ``:scheme``)
        added, as gRPC's CheckRequest has them.

    Raises:
        BadRequestError: the reader flagged a problem (over 96 KiB of headers, a header that is not
            UTF-8), the target is not under the check prefix, a malformed method, no
            :data:`~sidecar.wire.CONTEXT_HEADER` or one that is not a JSON object of strings, or
            a context :func:`~sidecar.envoy_authz.context.route_context` refuses.
    """
    if check.problem:
        raise BadRequestError(check.problem)
    target = check.target
    if not target.startswith(_PREFIX):
        raise BadRequestError("the check's path is not under the check prefix")
    try:
        method = check.method.decode("ascii")
        path = target[_PREFIX_LEN:].decode()
    except UnicodeDecodeError:
        raise BadRequestError("the check's method or path is not UTF-8") from None
    if not METHOD.fullmatch(method):
        raise BadRequestError("missing or malformed HTTP method")
    headers = check.headers
    raw_context = headers.get(wire.CONTEXT_HEADER)
    if raw_context is None:
        raise BadRequestError(f"no {wire.CONTEXT_HEADER}: the route names no context")
    direction, interception, upstream_tls, rpc, plain_cap = _context(raw_context)
    ours = [name for name in headers if name.startswith(_OURS)]
    extra = {name: headers.pop(name) for name in ours}
    scheme, authority = extra.get(wire.SCHEME_HEADER, ""), headers.pop("host", "")
    # the client request's pseudo-headers, named as in gRPC's CheckRequest: Envoy's header limits
    # count them (sidecar.policy.headers), and ``host`` is ``:authority`` there
    headers[":authority"], headers[":method"], headers[":path"], headers[":scheme"] = authority, method, path, scheme
    return AuthzRequest(
        direction=direction,
        method=method,
        scheme=scheme,
        authority=authority,
        path=path,
        headers=headers,
        request_id=headers.get("x-request-id", ""),
        peer_certificate=extra.get(wire.PEER_CERTIFICATE_HEADER, ""),
        destination=extra.get(wire.DESTINATION_HEADER, ""),
        interception=interception,
        upstream_tls=upstream_tls,
        # set by Envoy before ext_authz on the intercepting chains only (the agent's own is removed first)
        connect=extra.get(wire.CONNECT_AUTHORITY_HEADER, "")[:300] if interception is not None else "",
        rpc=rpc,
        body=check.body if (rpc is not None and rpc.body_cap) or plain_cap else None,
        body_cap=plain_cap,
    )


def _field(name: str, value: str) -> bytes:
    if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
        raise ValueError(f"header {name!r} cannot be sent")
    return f"{name}: {value}\r\n".encode()


def _metadata(decision: Decision, verdict: str) -> list[bytes]:
    fields = [
        _field(wire.METADATA_DECISION_ID, decision.decision_id),
        _field(wire.METADATA_DECISION, verdict),
        _field(wire.METADATA_REASON, decision.reason.value),
        _field(wire.METADATA_TASK_ID, decision.task_id or ""),
    ]
    if decision.list_filter is not None:  # JSON with non-ASCII escaped (\uXXXX): a header value
        listed = json.dumps(list(decision.list_filter), ensure_ascii=True, separators=(",", ":"))
        fields.append(_field(wire.METADATA_LIST_FILTER, listed))
    return fields


def _allow(decision: Decision) -> bytes:
    lines = [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"]
    names = set()
    for name, value in decision.headers_to_set:
        names.add(name)
        lines.append(_field(name, value))
    if wire.DECISION_ID_HEADER not in names:  # the client's response carries it too
        lines.append(_field(wire.DECISION_ID_HEADER, decision.decision_id))
    if decision.remaining is not None:  # to the client's response only (not an upstream header)
        lines.append(_field(wire.REMAINING_HEADER, str(decision.remaining)))
    if decision.headers_to_remove:
        lines.append(_field(wire.HEADERS_TO_REMOVE_HEADER, ",".join(decision.headers_to_remove)))
    lines += _metadata(decision, "allow")
    lines.append(b"\r\n")
    return b"".join(lines)


def _deny(decision: Decision) -> bytes:
    status = decision.http_status if 400 <= decision.http_status < 500 else 403
    body = deny_body(decision).encode()
    lines = [
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        % (status, _REASON_PHRASES.get(status, b"Denied"), len(body)),
        _field(wire.DECISION_ID_HEADER, decision.decision_id),
        _field(wire.REASON_HEADER, decision.reason.value),
        *_metadata(decision, "deny"),
        b"\r\n",
        body,
    ]
    return b"".join(lines)


def build_http_answer(decision: Decision) -> bytes:
    """The HTTP/1.1 answer to a check (status line, headers, body) for ``decision``.

    Allow: ``200``, ``content-length: 0``, the headers to set, the decision id header (also on the
    client's response: ``allowed_client_headers_on_success``), under a budget
    :data:`~sidecar.wire.REMAINING_HEADER` (the client's response only), :data:`~sidecar.wire.HEADERS_TO_REMOVE_HEADER`
    and the metadata headers (:data:`~sidecar.wire.HTTP_METADATA_KEYS`). Deny: the decision's status
    (``403`` when it is not a ``4xx``), the JSON body, ``content-type``, the decision id and reason
    headers and the metadata headers.

    Raises:
        ValueError: a header name or value cannot be written safely (the caller answers an
            ``internal_error`` deny instead, and records that).
    """
    return _allow(decision) if decision.allow else _deny(decision)
