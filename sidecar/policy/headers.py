"""What an allowed request may carry when Envoy forwards it: no forged reserved header, and within
Envoy's header limits once the sidecar's own headers are added.

* **Reserved headers.** ``x-agent-authz-*`` names belong to the sidecar and Envoy
  (:data:`~sidecar.wire.RESERVED_HEADER_PREFIX`): ``x-agent-authz-caller`` tells the agent's app
  who called it, an upstream may read ``x-agent-authz-decision-id``. A value the caller sent
  itself under such a name is removed from every allowed request, egress and ingress (the ones
  the decision sets overwrite it anyway).
* **Header limits.** After ext_authz added its headers, Envoy checks the request against
  ``max_request_headers_kb`` and ``max_headers_count`` and answers 500 when it is over - after the
  sidecar recorded an allow. :func:`over_envoy_limits` computes Envoy's sum (``HeaderMap::byteSize``:
  name plus value of every header, pseudo-headers included) from the CheckRequest's headers, so the
  caller denies instead (``headers_too_large``). Envoy joins repeated headers with ``,`` in the
  CheckRequest, so each comma counts as a possible separate header: the estimate never falls short.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sidecar.wire import MAX_REQUEST_HEADERS_COUNT, MAX_REQUEST_HEADERS_KB, RESERVED_HEADER_PREFIX

__all__ = ["forged_reserved", "over_envoy_limits"]

_MAX_BYTES = MAX_REQUEST_HEADERS_KB * 1024


def forged_reserved(headers: Mapping[str, str], setting: Iterable[str]) -> tuple[str, ...]:
    """The ``x-agent-authz-*`` headers of ``headers`` (lower-case names) that the decision does not set
    itself (``setting``): what Envoy must remove before forwarding."""
    own = set(setting)
    return tuple(sorted(k for k in headers if k.startswith(RESERVED_HEADER_PREFIX) and k not in own))


def over_envoy_limits(
    headers: Mapping[str, str], to_set: Iterable[tuple[str, str]], to_remove: Iterable[str]
) -> str | None:
    """Why the request would be over Envoy's header limits once ``to_set`` and ``to_remove`` are applied,
    or ``None`` when it fits.

    Args:
        headers: the CheckRequest's headers (lower-case names, repeated headers comma-joined).
        to_set: headers the decision overwrites or adds.
        to_remove: headers the decision removes.

    Returns:
        A short explanation naming the sizes (bytes, counts), or ``None``.
    """
    setting = dict(to_set)
    added = sum(len(name) + len(value) for name, value in setting.items())
    # an upper bound first, in C loops: every header kept, every comma a separate header with the
    # longest name; most requests are far below the limits and need no more than this
    commas = "".join(headers.values()).count(",")
    longest = max(map(len, headers), default=0)
    bound = sum(map(len, headers)) + sum(map(len, headers.values())) + commas * longest + added
    if bound <= _MAX_BYTES and len(headers) + commas + len(setting) <= MAX_REQUEST_HEADERS_COUNT:
        return None
    gone = set(to_remove) | setting.keys()
    size = count = 0
    for name, value in headers.items():
        if name in gone:
            continue
        commas = value.count(",")
        size += len(name) + len(value) + commas * max(len(name) - 1, 0)
        count += 1 + commas
    size += added
    count += len(setting)
    if size > _MAX_BYTES:
        return f"the request's headers with the sidecar's would be {size} bytes; Envoy forwards at most {_MAX_BYTES}"
    if count > MAX_REQUEST_HEADERS_COUNT:
        return f"the request would carry {count} headers; Envoy forwards at most {MAX_REQUEST_HEADERS_COUNT}"
    return None
