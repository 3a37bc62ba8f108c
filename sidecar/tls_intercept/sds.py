"""A gRPC Secret Discovery Service for the pod-CA leaves: Envoy gets each intercepted host's certificate
and key over its gRPC connection to the sidecar, never through a file.

``envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets``, state-of-the-world xDS
(``envoy.service.discovery.v3``; xDS protocol: "Basic protocol overview", "ACK/NACK and resource
type instance version"), served by the same grpc.aio server as ext_authz and reached by Envoy through
the ``agent_authz`` cluster. Messages are the upb classes of ``xds-protos``.

* Envoy sends a ``DiscoveryRequest`` naming the secrets it wants (``intercept|<host>``); every
  response holds all of the requested secrets the store has (the full state of what was asked),
  with a fresh ``version_info`` and ``nonce``;
* a request that only acknowledges (same names, nothing new) gets no answer; one carrying
  ``error_detail`` is a NACK and is logged (``sds_nack``); the previous secret stays in Envoy;
* when a secret changes (a rotated leaf), every stream that asked for it gets a new response at
  once, so new handshakes use the new leaf while open connections keep theirs.

The :class:`SecretStore` is filled from the intercept manager's worker thread and read by the
streams on the event loop; a lock guards it, and change notices cross to the loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import structlog
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2

__all__ = ["SECRET_TYPE_URL", "SERVICE_NAME", "SecretStore"]

SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
_log = structlog.get_logger("agent_authz.sds")
_CHANGED = object()
_END = object()


class SecretStore:
    """The secrets Envoy may ask for, and the SDS streams that asked. Not meant for subclassing.

    Attributes:
        responses: ``DiscoveryResponse`` messages sent, over all streams.
        nacks: NACKs received.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, tuple[int, secret_pb2.Secret]] = {}
        self._version = itertools.count(1)
        self._nonce = itertools.count(1)
        self._streams: set[asyncio.Queue[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.responses = 0
        self.nacks = 0

    # -- the manager's side (any thread) ----------------------------------------------------------
    def put_certificate(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Set secret ``name`` to a TLS certificate chain and its private key (PEM) and notify the streams."""
        secret = secret_pb2.Secret(name=name)
        secret.tls_certificate.certificate_chain.inline_bytes = cert_pem
        secret.tls_certificate.private_key.inline_bytes = key_pem
        with self._lock:
            self._secrets[name] = (next(self._version), secret)
        self._notify()

    def remove(self, name: str) -> None:
        """Forget secret ``name`` (Envoy keeps what it has until it stops asking)."""
        with self._lock:
            self._secrets.pop(name, None)

    def names(self) -> list[str]:
        """The secrets held now, sorted."""
        with self._lock:
            return sorted(self._secrets)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the gRPC server (and so every stream) runs on."""
        self._loop = loop

    def _notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for queue in self._streams:
            queue.put_nowait(_CHANGED)

    # -- the gRPC side (the event loop) -------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler for ``StreamSecrets`` (add it to the ext_authz server)."""
        method = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"StreamSecrets": method})

    def _response(self, names: Iterable[str]) -> tuple[discovery_pb2.DiscoveryResponse | None, tuple[int, ...]]:
        """All requested secrets the store has, and their versions (to tell whether anything changed)."""
        with self._lock:
            found = [self._secrets[n] for n in sorted(names) if n in self._secrets]
        versions = tuple(version for version, _ in found)
        if not found:
            return None, versions
        response = discovery_pb2.DiscoveryResponse(
            version_info=str(max(versions)), type_url=SECRET_TYPE_URL, nonce=str(next(self._nonce))
        )
        for _, secret in found:
            response.resources.add().Pack(secret)
        return response, versions

    async def _stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in requests:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(_END)

        reader = asyncio.ensure_future(read())
        self._streams.add(queue)
        wanted: frozenset[str] = frozenset()
        sent: tuple[frozenset[str], tuple[int, ...]] | None = None
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    if item.type_url and item.type_url != SECRET_TYPE_URL:
                        _log.warning("sds_wrong_type", type_url=item.type_url)
                        continue
                    if item.HasField("error_detail"):
                        self.nacks += 1
                        _log.error("sds_nack", names=list(item.resource_names), error=item.error_detail.message)
                    wanted = frozenset(item.resource_names)
                response, versions = self._response(wanted)
                if response is not None and sent != (wanted, versions):
                    sent = (wanted, versions)
                    self.responses += 1
                    yield response
        finally:
            self._streams.discard(queue)
            reader.cancel()
