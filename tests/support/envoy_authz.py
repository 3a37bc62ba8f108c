"""Serialized ``CheckRequest`` messages as Envoy's HTTP ext_authz filter sends them."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2

from tests.support.config import API_HOST

__all__ = ["check_request"]


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
