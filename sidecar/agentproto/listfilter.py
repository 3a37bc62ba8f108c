"""Filter a ``tools/list`` response to the tools a task may call.

The response of an MCP server reaches the agent as ``application/json`` (one JSON-RPC response),
or, on the Streamable HTTP transport, as ``text/event-stream``: Server-Sent Events (HTML Living
Standard §9.2, "event stream interpretation") whose ``data`` fields each hold one JSON-RPC message.
Only a JSON-RPC response whose ``result`` has a ``tools`` array is changed: each tool whose
``name`` the allowed set does not match is removed; every other member, message and event is kept
as it was (events that change are written back with their ``event``, ``id`` and ``retry`` fields and
one ``data`` line).

A body that cannot be read this way is not passed on as it is: the caller answers with
:func:`error_body` instead (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = ["FilterError", "Filtered", "error_body", "filter_tools_list"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_EVENT_BREAK = re.compile(rb"(?:\r\n|\r|\n)(?:\r\n|\r|\n)")


class FilterError(AgentAuthzError):
    """The response cannot be filtered (not JSON, not an event stream, encoded)."""

    code = ErrorCode.RESPONSE_UNFILTERABLE


@dataclass(frozen=True, slots=True)
class Filtered:
    """The outcome.

    Attributes:
        body: the body to send on (the same object as the input when nothing changed).
        shown / hidden: how many tools were kept and removed.
    """

    body: bytes
    shown: int
    hidden: int


def _filter_message(message: Any, allowed: Callable[[str], bool]) -> tuple[Any, int, int] | None:
    """``(message, shown, hidden)`` with the tools filtered, or ``None`` if it is no tools list."""
    if isinstance(message, list):  # a batch answer from an older server
        changed, shown, hidden, out = False, 0, 0, []
        for item in message:
            result = _filter_message(item, allowed)
            if result is None:
                out.append(item)
                continue
            changed, shown, hidden = True, shown + result[1], hidden + result[2]
            out.append(result[0])
        return (out, shown, hidden) if changed else None
    if not isinstance(message, dict) or "method" in message:
        return None
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return None
    tools = result["tools"]
    kept = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str) and allowed(t["name"])]
    return {**message, "result": {**result, "tools": kept}}, len(kept), len(tools) - len(kept)


def _filter_json(body: bytes, allowed: Callable[[str], bool]) -> Filtered:
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FilterError("the response is not JSON") from None
    result = _filter_message(message, allowed)
    if result is None:
        return Filtered(body, 0, 0)
    return Filtered(orjson.dumps(result[0]), result[1], result[2])


def _filter_event(raw: bytes, allowed: Callable[[str], bool]) -> tuple[bytes, int, int]:
    data: list[bytes] = []
    others: list[bytes] = []
    for line in _LINE_BREAK.split(raw):
        if line.startswith(b":"):
            continue  # a comment
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name in (b"event", b"id", b"retry"):
            others.append(line)
    if not data:
        return raw, 0, 0
    try:
        message = orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        raise FilterError("an event's data is not JSON") from None
    result = _filter_message(message, allowed)
    if result is None:
        return raw, 0, 0
    return b"\n".join([*others, b"data: " + orjson.dumps(result[0])]), result[1], result[2]


def _filter_sse(body: bytes, allowed: Callable[[str], bool]) -> Filtered:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise FilterError("the event stream is not UTF-8") from None
    out: list[bytes] = []
    separators: list[bytes] = []
    shown = hidden = 0
    position = 0
    changed = False
    for match in _EVENT_BREAK.finditer(body):
        event, position = body[position : match.start()], match.end()
        new, s, h = _filter_event(event, allowed)
        changed |= new is not event
        out.append(new)
        separators.append(match.group(0))
        shown, hidden = shown + s, hidden + h
    tail = body[position:]
    if tail.strip():  # an unterminated last event is discarded by clients (§9.2.6): filter it as well
        new, s, h = _filter_event(tail, allowed)
        changed |= new is not tail
        tail, shown, hidden = new, shown + s, hidden + h
    if not changed:
        return Filtered(body, shown, hidden)
    return Filtered(b"".join(e + sep for e, sep in zip(out, separators, strict=True)) + tail, shown, hidden)


def filter_tools_list(body: bytes, content_type: str, allowed: Callable[[str], bool]) -> Filtered:
    """Remove the tools ``allowed`` refuses from a ``tools/list`` response body.

    Args:
        body: the whole response body (not encoded: the caller refuses a ``Content-Encoding``).
        content_type: the response's ``Content-Type``.
        allowed: whether a tool name may be shown.

    Returns:
        The filtered body and the counts.

    Raises:
        FilterError: a media type other than JSON or an event stream, invalid JSON (also in an
            event's ``data``), or an event stream that is not UTF-8.
    """
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json":
        return _filter_json(body, allowed)
    if media == "text/event-stream":
        return _filter_sse(body, allowed)
    if not body:
        return Filtered(body, 0, 0)
    raise FilterError(f"cannot filter a {media or 'untyped'} response")


def error_body(request_id: str | int | None, message: str) -> bytes:
    """A JSON-RPC 2.0 error response (``-32603``, internal error) for a response that could not be
    filtered."""
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32603, "message": message}})
