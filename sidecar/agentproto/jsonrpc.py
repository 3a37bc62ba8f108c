"""A strict reader of one JSON-RPC 2.0 message, for judging MCP and A2A calls.

An intermediary that decides on a body must read it exactly as the server will, or refuse it. So
anything two conforming parsers could read differently is refused rather than guessed
(RFC 8259 §4: "the names within an object SHOULD be unique" - behaviour with duplicates is
unpredictable; §8.1: UTF-8 without a byte order mark; §6: numbers out of range are implementation
defined). Each refusal carries a stable :class:`BodyProblem` sub-code.

What is refused:

* a body over the cap (``too_large``), a ``Content-Encoding`` other than ``identity``
  (``content_encoding``: Envoy hands over the bytes as sent, and a decision on compressed bytes
  would be a decision on nothing), a media type other than ``application/json`` (``content_type``);
* bytes that are not UTF-8 (``not_utf8``), a byte order mark (``bom``), a ``\\uD800``-style lone
  surrogate escape (``lone_surrogate``);
* invalid JSON (``invalid_json``): syntax errors, ``NaN``/``Infinity``, numbers that overflow a
  double, integers longer than Python's 4300-digit limit;
* a name appearing twice in one object, at any depth (``duplicate_key``);
* nesting deeper than :data:`MAX_DEPTH` (``too_deep``);
* a top-level array (``batch``: JSON-RPC batches were removed from MCP in 2025-06-18, and one
  decision per HTTP request needs one message per request);
* anything that is not one JSON-RPC 2.0 request, notification or response (``not_jsonrpc``,
  JSON-RPC 2.0 §4, §5: ``jsonrpc`` exactly ``"2.0"``, a string ``method``, an ``id`` that is a
  string, an integer or null, ``params`` an object or array, no other members).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.errors import BadRequestError

__all__ = [
    "MAX_DEPTH",
    "BodyError",
    "BodyProblem",
    "MessageKind",
    "RpcMessage",
    "parse_message",
]

MAX_DEPTH = 32
"""Deepest nesting of objects and arrays accepted (the message itself is depth 1)."""

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_REQUEST_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})
_RESPONSE_MEMBERS = frozenset({"jsonrpc", "id", "result", "error"})
_BOM = b"\xef\xbb\xbf"


class BodyProblem(enum.StrEnum):
    """Why a body cannot be judged; the stable first word of a deny's ``detail``."""

    TOO_LARGE = "too_large"
    CONTENT_ENCODING = "content_encoding"
    CONTENT_TYPE = "content_type"
    NOT_UTF8 = "not_utf8"
    BOM = "bom"
    LONE_SURROGATE = "lone_surrogate"
    INVALID_JSON = "invalid_json"
    DUPLICATE_KEY = "duplicate_key"
    TOO_DEEP = "too_deep"
    BATCH = "batch"
    NOT_JSONRPC = "not_jsonrpc"


AMBIGUOUS = frozenset(
    {
        BodyProblem.CONTENT_ENCODING,
        BodyProblem.NOT_UTF8,
        BodyProblem.BOM,
        BodyProblem.LONE_SURROGATE,
        BodyProblem.DUPLICATE_KEY,
        BodyProblem.TOO_DEEP,
        BodyProblem.BATCH,
    }
)
"""Problems where two readers could see two different messages (``mcp_ambiguous_body``); the rest
are a body that is not one valid JSON-RPC message at all (``mcp_invalid_body``), except
``too_large`` (``mcp_body_too_large``)."""


class BodyError(BadRequestError):
    """The body cannot be judged (``mcp_ambiguous_body``, ``mcp_invalid_body``, ``mcp_body_too_large``).

    Attributes:
        problem: the stable sub-code.
    """

    def __init__(self, problem: BodyProblem, message: str) -> None:
        super().__init__(f"{problem.value}: {message}")
        self.problem = problem


class MessageKind(enum.StrEnum):
    """JSON-RPC 2.0 §4 request (has ``id``), §4.1 notification (no ``id``), §5 response."""

    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """One JSON-RPC 2.0 message.

    Attributes:
        kind: request, notification or response.
        method: the method (``""`` for a response).
        id: the request id (``None`` for a notification).
        params: ``params`` when it is an object, else ``None`` (absent, or a by-position array).
    """

    kind: MessageKind
    method: str
    id: str | int | None
    params: Mapping[str, Any] | None

    def param_str(self, key: str) -> str | None:
        """``params[key]`` when it is a string, else ``None``."""
        value = self.params.get(key) if self.params is not None else None
        return value if isinstance(value, str) else None


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(BodyProblem.DUPLICATE_KEY, f"the name {key[:64]!r} appears twice in one object")
            seen.add(key)
    return result


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BodyError(BodyProblem.INVALID_JSON, "a number overflows a double")
    return value


def _constant(text: str) -> Any:
    raise BodyError(BodyProblem.INVALID_JSON, f"{text} is not JSON")


def _check_tree(root: Any, max_depth: int) -> None:
    """Depth and lone surrogates, iteratively (no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if _LONE_SURROGATE.search(node):
                raise BodyError(BodyProblem.LONE_SURROGATE, "a string holds a lone UTF-16 surrogate escape")
            continue
        if isinstance(node, dict):
            children: Any = node.values()
            for key in node:
                if _LONE_SURROGATE.search(key):
                    raise BodyError(BodyProblem.LONE_SURROGATE, "a name holds a lone UTF-16 surrogate escape")
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise BodyError(BodyProblem.TOO_DEEP, f"nested deeper than {max_depth}")
        stack.extend((child, depth + 1) for child in children)


def _media_type_ok(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _is_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_message(
    body: bytes,
    *,
    cap: int,
    content_type: str | None = "application/json",
    content_encoding: str | None = None,
    max_depth: int = MAX_DEPTH,
) -> RpcMessage:
    """Read ``body`` as exactly one JSON-RPC 2.0 message, or refuse it.

    Args:
        body: the request body as Envoy buffered it (bytes, not re-encoded).
        cap: the largest body accepted, in bytes.
        content_type: the ``Content-Type`` header (``None`` when absent: refused).
        content_encoding: the ``Content-Encoding`` header, ``None`` when absent.
        max_depth: deepest nesting accepted.

    Returns:
        The message.

    Raises:
        BodyError: the body cannot be judged; ``problem`` says why (see the module docstring).
    """
    if len(body) > cap:
        raise BodyError(BodyProblem.TOO_LARGE, f"the body is over the {cap}-byte cap")
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise BodyError(BodyProblem.CONTENT_ENCODING, "a compressed or encoded body cannot be judged")
    if content_type is None or not _media_type_ok(content_type):
        raise BodyError(BodyProblem.CONTENT_TYPE, "the body must be application/json (UTF-8)")
    if body.startswith(_BOM):
        raise BodyError(BodyProblem.BOM, "the body starts with a byte order mark (RFC 8259 §8.1)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(BodyProblem.NOT_UTF8, "the body is not UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_float=_float, parse_constant=_constant)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(BodyProblem.TOO_DEEP, f"nested deeper than {max_depth}") from None
    except ValueError as exc:  # JSONDecodeError, and the 4300-digit integer limit
        raise BodyError(BodyProblem.INVALID_JSON, type(exc).__name__) from None
    _check_tree(value, max_depth)
    if isinstance(value, list):
        raise BodyError(BodyProblem.BATCH, "a JSON-RPC batch (one message per request)")
    if not isinstance(value, dict):
        raise BodyError(BodyProblem.NOT_JSONRPC, "the body is not a JSON object")
    return _message(value)


def _message(value: dict[str, Any]) -> RpcMessage:
    if value.get("jsonrpc") != "2.0":
        raise BodyError(BodyProblem.NOT_JSONRPC, "'jsonrpc' must be \"2.0\"")
    if "id" in value and not _is_id(value["id"]):
        raise BodyError(BodyProblem.NOT_JSONRPC, "'id' must be a string, an integer or null")
    if "method" not in value:
        if not set(value) <= _RESPONSE_MEMBERS or "id" not in value or (("result" in value) == ("error" in value)):
            raise BodyError(BodyProblem.NOT_JSONRPC, "neither a request nor a response")
        return RpcMessage(MessageKind.RESPONSE, "", value["id"], None)
    if not set(value) <= _REQUEST_MEMBERS:
        extra = sorted(set(value) - _REQUEST_MEMBERS)
        raise BodyError(BodyProblem.NOT_JSONRPC, f"unexpected members {extra[:4]!r}")
    method = value["method"]
    if not isinstance(method, str) or not method:
        raise BodyError(BodyProblem.NOT_JSONRPC, "'method' must be a non-empty string")
    params = value.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise BodyError(BodyProblem.NOT_JSONRPC, "'params' must be an object or an array")
    kind = MessageKind.REQUEST if "id" in value else MessageKind.NOTIFICATION
    return RpcMessage(kind, method, value.get("id"), params if isinstance(params, dict) else None)
