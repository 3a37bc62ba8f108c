"""Serialized ``CheckRequest`` messages, and raw HTTP checks, as Envoy's HTTP ext_authz filter sends them."""

from __future__ import annotations

import json

from envoy.service.auth.v3 import external_auth_pb2

from sidecar import wire
from tests.support.config import API_HOST

__all__ = ["check_request", "http_check"]


def check_request(
    *,
    method: str = "GET",
    host: str = API_HOST,
    path: str = "/v1/items/1",
    headers: dict[str, str] | None = None,
    direction: str | None = "egress",
    http: bool = True,
    context: dict[str, str] | None = None,
) -> bytes:
    """One CheckRequest; ``context`` adds route ``context_extensions`` (the keys of :mod:`sidecar.wire`)."""
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    if http:
        h = attrs.request.http
        h.method, h.host, h.path, h.scheme, h.id = method, host, path, "http", "42"
        h.headers.update(headers or {})
    if direction is not None:
        attrs.context_extensions["direction"] = direction
    attrs.context_extensions.update(context or {})
    return request.SerializeToString()


def http_check(
    *,
    method: str = "GET",
    host: str = API_HOST,
    path: str = "/v1/items/1",
    headers: dict[str, str] | None = None,
    direction: str | None = "egress",
    context: dict[str, str] | None = None,
    body: bytes = b"",
    prefix: str = wire.HTTP_CHECK_PREFIX,
) -> bytes:
    """One HTTP check as Envoy's HTTP service sends it (HTTP/1.1, ``context`` in ``x-agent-authz-context``)."""
    fields = {"host": host, "content-length": str(len(body)), "x-request-id": "42", **(headers or {})}
    route = {**({"direction": direction} if direction is not None else {}), **(context or {})}
    if direction is not None or context:
        fields[wire.CONTEXT_HEADER] = json.dumps(route, separators=(",", ":"))
    fields.setdefault(wire.SCHEME_HEADER, "http")
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"{method} {prefix}{path} HTTP/1.1\r\n{head}\r\n".encode() + body
