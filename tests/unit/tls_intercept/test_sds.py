"""The gRPC SDS of the pod-CA leaves, driven by a client speaking the xDS state-of-the-world protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from sidecar.tls_intercept.sds import SECRET_TYPE_URL, SERVICE_NAME, SecretStore

A, B = "intercept|a.example.com", "intercept|b.example.com"


def _names(response: discovery_pb2.DiscoveryResponse) -> dict[str, bytes]:
    out = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        out[secret.name] = secret.tls_certificate.certificate_chain.inline_bytes
        assert secret.tls_certificate.private_key.inline_bytes.startswith(b"KEY")
    return out


async def _exchange(sock: Path) -> None:
    store = SecretStore()
    store.put_certificate(A, b"CERT-A1", b"KEY-A1")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((store.handler(),))
    server.add_insecure_port(f"unix:{sock}")
    store.bind(asyncio.get_running_loop())
    await server.start()
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (request := await requests.get()) is not None:
            yield request

    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            call = channel.stream_stream(
                f"/{SERVICE_NAME}/StreamSecrets",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )(outgoing())

            def ask(names: list[str], response: discovery_pb2.DiscoveryResponse | None = None, **extra: object) -> None:
                request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=names, **extra)
                if response is not None:  # an ACK (or NACK) of ``response``
                    request.version_info, request.response_nonce = response.version_info, response.nonce
                requests.put_nowait(request)

            async def next_response() -> discovery_pb2.DiscoveryResponse:
                return await asyncio.wait_for(call.read(), timeout=5)

            ask([A, B])  # B does not exist yet: the response holds what the store has
            first = await next_response()
            assert first.type_url == SECRET_TYPE_URL and _names(first) == {A: b"CERT-A1"}
            ask([A, B], first)  # ACK: nothing to answer
            store.put_certificate(B, b"CERT-B1", b"KEY-B1")  # from another thread in the sidecar: same path
            second = await next_response()
            assert _names(second) == {A: b"CERT-A1", B: b"CERT-B1"}  # the full state of what was asked
            assert second.nonce != first.nonce and int(second.version_info) > int(first.version_info)
            ask([A, B], second)
            await asyncio.to_thread(store.put_certificate, A, b"CERT-A2", b"KEY-A2")  # a rotation, pushed at once
            third = await next_response()
            assert _names(third) == {A: b"CERT-A2", B: b"CERT-B1"}
            nack = discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE_URL,
                resource_names=[A, B],
                version_info=second.version_info,
                response_nonce=third.nonce,
                error_detail=status_pb2.Status(code=3, message="bad certificate"),
            )
            requests.put_nowait(nack)
            ask([B])  # Envoy dropped A (its filter chain is gone): only B from now on
            fourth = await next_response()
            assert _names(fourth) == {B: b"CERT-B1"}
            store.remove(A)
            assert store.names() == [B]
            requests.put_nowait(None)
            assert await asyncio.wait_for(call.read(), timeout=5) is grpc.aio.EOF
            assert store.nacks == 1 and store.responses == 4
    finally:
        await server.stop(0)


def test_state_of_the_world_exchange(tmp_path: Path) -> None:
    asyncio.run(_exchange(tmp_path / "sds.sock"))
