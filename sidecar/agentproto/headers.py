"""The MCP 2026-07-28 Streamable HTTP standard headers (SEP-2243): ``Mcp-Method`` and ``Mcp-Name``.

Clients of the 2026-07-28 revision mirror the JSON-RPC ``method`` of every POST in ``Mcp-Method``,
and the target of ``tools/call`` / ``prompts/get`` (``params.name``) and ``resources/read``
(``params.uri``) in ``Mcp-Name``, so that intermediaries can decide without reading the body;
servers reject a request whose headers disagree with its body (JSON-RPC error ``-32020``,
HeaderMismatch). A value that is not visible ASCII travels as ``=?base64?<base64 of UTF-8>?=``.

Clients of the handshake revisions (2025-11-25 and earlier) send neither header.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.agentproto.jsonrpc import MessageKind, RpcMessage
from sidecar.errors import BadRequestError

__all__ = [
    "MCP_METHOD_HEADER",
    "MCP_NAME_HEADER",
    "NAME_PARAMS",
    "HeaderError",
    "McpHeaders",
    "check_headers",
    "read_headers",
]

MCP_METHOD_HEADER = "mcp-method"
MCP_NAME_HEADER = "mcp-name"
NAME_PARAMS: Mapping[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
"""Method -> the ``params`` member mirrored in ``Mcp-Name`` (SEP-2243)."""

_BASE64 = re.compile(r"^=\?base64\?([A-Za-z0-9+/]*={0,2})\?=$")
_VISIBLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


class HeaderError(BadRequestError):
    """The MCP headers are malformed or disagree with the body (``mcp_header_mismatch``)."""


@dataclass(frozen=True, slots=True)
class McpHeaders:
    """The standard headers of one request.

    Attributes:
        method: ``Mcp-Method``, or ``None`` when absent.
        name: ``Mcp-Name`` decoded, or ``None`` when absent.
    """

    method: str | None
    name: str | None


def _decode(value: str) -> str:
    match = _BASE64.match(value)
    if match is None:
        if not _VISIBLE_ASCII.match(value):
            raise HeaderError("Mcp-Name holds characters outside visible ASCII without base64 encoding")
        return value
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise HeaderError("Mcp-Name is not valid base64 of UTF-8") from None


def read_headers(headers: Mapping[str, str]) -> McpHeaders:
    """Read ``Mcp-Method`` and ``Mcp-Name`` from lower-case request headers.

    Envoy joins repeated headers with commas, so a header sent twice never equals a body value and
    is refused at :func:`check_headers`; an empty value is refused here.

    Raises:
        HeaderError: an empty value, or an ``Mcp-Name`` that is neither visible ASCII nor valid
            ``=?base64?…?=``.
    """
    method = headers.get(MCP_METHOD_HEADER)
    name = headers.get(MCP_NAME_HEADER)
    if method is not None and not method:
        raise HeaderError("Mcp-Method is empty")
    if name is not None:
        if not name:
            raise HeaderError("Mcp-Name is empty")
        name = _decode(name)
    if name is not None and method is None:
        raise HeaderError("Mcp-Name without Mcp-Method")
    return McpHeaders(method, name)


def check_headers(headers: McpHeaders, message: RpcMessage) -> None:
    """Check that the headers agree with the body they came with (SEP-2243).

    Without ``Mcp-Method`` (a client of a handshake revision) there is nothing to compare. With it:
    it equals the body's method (a response body carries none, so any ``Mcp-Method`` disagrees);
    for a name-bearing method ``Mcp-Name`` is present and equals the body's name parameter.

    Raises:
        HeaderError: they disagree, or a required ``Mcp-Name`` is missing.
    """
    if headers.method is None:
        return
    if message.kind is MessageKind.RESPONSE or headers.method != message.method:
        raise HeaderError("Mcp-Method does not match the body's method")
    key = NAME_PARAMS.get(message.method)
    if key is None:  # other methods may mirror a name too (resources/subscribe); it decides nothing here
        return
    if headers.name is None:
        raise HeaderError(f"{message.method} without Mcp-Name")
    if headers.name != message.param_str(key):
        raise HeaderError(f"Mcp-Name does not match the body's params.{key}")
