"""RFC 6901 JSON pointers into tool arguments."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["MISSING", "resolve_pointer", "split_pointer"]

MISSING: Final = object()
"""Returned by :func:`resolve_pointer` when the pointer names no value."""


def split_pointer(pointer: str) -> tuple[str, ...]:
    """The reference tokens of ``pointer`` (which starts with ``/``), unescaped (§4: ``~1`` then ``~0``)."""
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in pointer.split("/")[1:])


def resolve_pointer(document: Any, tokens: tuple[str, ...]) -> Any:
    """The value at the pointer with these tokens, or :data:`MISSING`.

    Array indexes are ``0`` or ASCII digits without a leading zero (§4); ``-`` names nothing.
    """
    node = document
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                return MISSING
            node = node[token]
        elif isinstance(node, list):
            if not (token.isascii() and token.isdigit()) or (len(token) > 1 and token[0] == "0"):
                return MISSING
            index = int(token)
            if index >= len(node):
                return MISSING
            node = node[index]
        else:
            return MISSING
    return node
