"""A small Kubernetes API client for ConfigMaps: get, replace (conditional on ``resourceVersion``) and watch.

It speaks to a real API server exactly as ``kubectl`` does, with the pod's ServiceAccount: the
bearer token from ``token_file`` (re-read before each request, since projected tokens rotate), the
server verified against ``ca_file``. The requests it makes, and the RBAC verbs they need on the one
ConfigMap each (the chart's Role names exactly these, with ``resourceNames``):

==========================================================================================  ==========
request                                                                                     verb
==========================================================================================  ==========
``GET /api/v1/namespaces/NS/configmaps/NAME``                                               ``get``
``PUT /api/v1/namespaces/NS/configmaps/NAME`` (``metadata.resourceVersion`` set: 409 if stale) ``update``
``GET /api/v1/namespaces/NS/configmaps?watch=true&fieldSelector=metadata.name=NAME&…``      ``watch``
==========================================================================================  ==========

A watch (API concepts "Efficient detection of changes") streams one JSON event per line; it is
resumed from the last ``resourceVersion`` seen, and an ``ERROR`` event with code 410 ("too old
resource version") means the caller must read the object afresh (:class:`KubeApiError` with
``status`` 410). ``BOOKMARK`` events only advance the resourceVersion.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = ["KubeApiError", "KubeClient", "WatchEvent"]

Json = dict[str, Any]
_MAX_LINE = 4 * 1024 * 1024


class KubeApiError(AgentAuthzError):
    """A Kubernetes API request failed.

    Attributes:
        status: the HTTP status (409 a conflict, 410 an expired resourceVersion, 0 no answer).
        reason: the ``Status`` reason (``Conflict``, ``NotFound``, ``Forbidden``, ``Expired``, ...).
    """

    code = ErrorCode.KUBERNETES_API

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event: ``ADDED``, ``MODIFIED``, ``DELETED`` (``object`` the ConfigMap) or ``BOOKMARK``."""

    type: str
    object: Json

    @property
    def resource_version(self) -> str:
        """The object's ``metadata.resourceVersion`` (a bookmark's too)."""
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class KubeClient:
    """ConfigMaps of one namespace through the API server at ``server``.

    Args:
        server: ``https://host:port``.
        token_file: the bearer token (re-read before each request).
        ca_file: the CA bundle that verifies the API server.
        namespace: the ConfigMaps' namespace.
        timeout: seconds per request (not for watches).
    """

    def __init__(self, server: str, *, token_file: Path, ca_file: Path, namespace: str, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self._token_file = token_file
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise aiohttp.ClientConnectionError("the client is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16), trust_env=False
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            raise KubeApiError(0, "NoToken", f"cannot read {self._token_file}: {exc.strerror or exc}") from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    def _path(self, name: str | None = None) -> str:
        base = f"{self.server}/api/v1/namespaces/{urllib.parse.quote(self.namespace)}/configmaps"
        return base if name is None else f"{base}/{urllib.parse.quote(name)}"

    @staticmethod
    async def _error(response: aiohttp.ClientResponse) -> KubeApiError:
        try:
            body = await response.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            body = {}
        if not isinstance(body, dict):
            body = {}
        return KubeApiError(response.status, str(body.get("reason", "")), str(body.get("message", response.reason)))

    async def _request(self, method: str, url: str, body: Json | None = None) -> Json:
        try:
            async with self._client().request(
                method,
                url,
                headers=self._headers("application/json" if body is not None else None),
                data=json.dumps(body).encode() if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                if response.status >= 300:
                    raise await self._error(response)
                result: Json = await response.json(content_type=None)
                return result
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeApiError(0, type(exc).__name__, str(exc) or "no answer") from None

    async def get_configmap(self, name: str) -> Json:
        """``GET`` the ConfigMap.

        Raises:
            KubeApiError: 404 when it does not exist, 403 without ``get`` on it, 0 without an answer.
        """
        return await self._request("GET", self._path(name))

    async def replace_configmap(self, obj: Json) -> Json:
        """``PUT`` the ConfigMap; with ``metadata.resourceVersion`` set, only over that version.

        Returns:
            The stored object (its new ``resourceVersion``).

        Raises:
            KubeApiError: 409 ``Conflict`` when someone wrote it since that version; others as
                :meth:`get_configmap`.
        """
        return await self._request("PUT", self._path(obj["metadata"]["name"]), obj)

    async def watch_configmap(self, name: str, resource_version: str, *, timeout: float) -> AsyncIterator[WatchEvent]:
        """Stream the ConfigMap's changes after ``resource_version`` for up to ``timeout`` seconds.

        Yields:
            :class:`WatchEvent` values (``BOOKMARK`` included) until the server ends the stream.

        Raises:
            KubeApiError: 410 ``Expired`` (read afresh, then watch again), or a failed request.
        """
        query = urllib.parse.urlencode(
            {
                "watch": "true",
                "fieldSelector": f"metadata.name={name}",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(int(timeout)),
            }
        )
        try:
            async with self._client().get(
                f"{self._path()}?{query}",
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=timeout + 30),
            ) as response:
                if response.status >= 300:
                    raise await self._error(response)
                while True:
                    line = await response.content.readline()
                    if not line:
                        return
                    if len(line) > _MAX_LINE:
                        raise KubeApiError(0, "BadEvent", "a watch event is larger than 4 MiB")
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        raise KubeApiError(
                            int(obj.get("code", 0)), str(obj.get("reason", "")), str(obj.get("message", ""))
                        )
                    yield WatchEvent(str(kind), obj)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeApiError(0, type(exc).__name__, str(exc) or "the watch ended") from None

    async def aclose(self) -> None:
        """Close the connections (the client cannot be used afterwards)."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            # a TLS connection closed by a cancelled watch finishes closing on the next loop turns
            # (aiohttp's "graceful shutdown" advice): give them that before the loop may end
            await asyncio.sleep(0.05)
