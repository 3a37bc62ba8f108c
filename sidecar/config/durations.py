"""Human durations such as ``250ms``, ``30s``, ``5m``, ``1h30m`` (the Go/Envoy style)."""

from __future__ import annotations

import re

__all__ = ["parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Parse a duration into seconds.

    Args:
        value: a non-negative number of seconds, or a string of number+unit parts
            (``ms``, ``s``, ``m``, ``h``, ``d``), e.g. ``"1h30m"``.

    Returns:
        Seconds as a float.

    Raises:
        ValueError: malformed or negative.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '5m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '30s' or '5m'")
    text = value.strip()
    pos = 0
    total = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r}; use e.g. '250ms', '30s', '5m', '1h30m'")
    return total
