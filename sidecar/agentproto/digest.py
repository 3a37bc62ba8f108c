"""What a decision record says about tool arguments: a digest, and only allow-listed values.

``arguments_digest`` is ``sha256:`` and the hex SHA-256 of the arguments in a canonical JSON form
(members sorted by name, no whitespace, UTF-8, numbers as Python's ``json`` writes them), so two
calls with the same arguments have the same digest whatever their member order or spacing. It is
for correlation, not secrecy: an argument with few possible values can be found from its digest
by trying them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.agentproto.pointer import MISSING, resolve_pointer, split_pointer

__all__ = ["MAX_RECORDED_STRING", "arguments_digest", "canonical_json", "recorded_arguments"]

MAX_RECORDED_STRING = 256
"""Longest string value a record carries; longer ones are cut and marked."""


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes (sorted members, no whitespace, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of :func:`canonical_json` of ``arguments``."""
    return "sha256:" + hashlib.sha256(canonical_json(arguments)).hexdigest()


def recorded_arguments(arguments: Mapping[str, Any], pointers: Iterable[str]) -> dict[str, Any]:
    """The allow-listed argument values, by pointer.

    A string longer than :data:`MAX_RECORDED_STRING` is cut (``…`` appended); an object or array is
    recorded as its digest; a pointer with no value is left out.
    """
    out: dict[str, Any] = {}
    for pointer in pointers:
        value = resolve_pointer(arguments, split_pointer(pointer))
        if value is MISSING:
            continue
        if isinstance(value, str) and len(value) > MAX_RECORDED_STRING:
            value = value[:MAX_RECORDED_STRING] + "…"
        elif isinstance(value, dict | list):
            value = "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()
        out[pointer] = value
    return out
