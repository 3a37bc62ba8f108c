"""A SPIFFE Workload API server for tests, speaking the real ``workload.proto`` over a Unix socket.

It stands in for a SPIRE agent (which cannot run here): it serves X.509-SVID and JWT bundle streams
from dev CAs, insists on the ``workload.spiffe.io: true`` security header as SPIRE does, and can
rotate the SVID, pushing the new one to every open stream. py-spiffe ships the generated stubs.
:func:`serve_sds` adds Envoy's Secret Discovery Service on the same socket, as the SPIRE agent does.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.identity.devca import DevCA

_DER = serialization.Encoding.DER
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - a type URL


class WorkloadApiServer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves one workload's SVID from ``ca`` plus federated bundles.

    Args:
        socket: Unix socket path to listen on.
        ca: the workload's trust domain CA.
        spiffe_id: the workload's SPIFFE ID.
        federated: other trust domains whose bundles are served too.
        ttl: SVID lifetime.
    """

    def __init__(
        self,
        socket: Path,
        ca: DevCA,
        spiffe_id: str,
        *,
        federated: dict[str, DevCA] | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> None:
        self.socket = socket
        self.ca = ca
        self.spiffe_id = spiffe_id
        self.federated = federated or {}
        self.ttl = ttl
        self.generation = 0
        self.rejected_without_header = 0
        self.jwt_documents: dict[str, bytes] | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._issue()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self._server.add_insecure_port(f"unix:{socket}")

    @property
    def address(self) -> str:
        """``unix:///path`` as py-spiffe and the sidecar config expect it."""
        return f"unix://{self.socket}"

    def _issue(self) -> None:
        chain, key = self.ca.issue_x509(self.spiffe_id, ttl=self.ttl)
        self.chain, self.key = chain, key
        self.serial = format(chain[0].serial_number, "x")

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._server.stop(grace=0.5).wait(5)

    def rotate(self) -> str:
        """Issue a new SVID and push it to open streams; returns its serial (hex)."""
        with self._cond:
            self._issue()
            self.generation += 1
            self._cond.notify_all()
            return self.serial

    def push(self, chain: list[Any], key: Any, *, spiffe_id: str | None = None) -> None:
        """Push exactly this chain (leaf first) and key - valid or not - as the next X.509-SVID update."""
        with self._cond:
            self.chain, self.key = chain, key
            self.serial = format(chain[0].serial_number, "x")
            if spiffe_id is not None:
                self.spiffe_id = spiffe_id
            self.generation += 1
            self._cond.notify_all()

    def push_jwt_bundles(self, documents: dict[str, bytes] | None) -> None:
        """Serve these JWT bundle documents (trust domain -> bytes, valid or not); ``None``: the CAs' own."""
        with self._cond:
            self.jwt_documents = documents
            self.generation += 1
            self._cond.notify_all()

    # -- protocol --------------------------------------------------------------------------------
    def _check_header(self, context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get("workload.spiffe.io") != "true":
            self.rejected_without_header += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def _x509_response(self) -> workload_pb2.X509SVIDResponse:
        svid = workload_pb2.X509SVID(
            spiffe_id=self.spiffe_id,
            x509_svid=b"".join(c.public_bytes(_DER) for c in self.chain),
            x509_svid_key=self.key.private_bytes(_DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            bundle=self.ca.ca_cert.public_bytes(_DER),
        )
        federated = {f"spiffe://{td}": ca.ca_cert.public_bytes(_DER) for td, ca in self.federated.items()}
        return workload_pb2.X509SVIDResponse(svids=[svid], federated_bundles=federated)

    def _stream(self, context: grpc.ServicerContext, build: object) -> Iterator[object]:
        seen = -1
        while True:
            with self._cond:
                while seen == self.generation and not self._stopping and context.is_active():
                    self._cond.wait(0.2)
                if self._stopping or not context.is_active():
                    return
                seen = self.generation
                response = build()  # type: ignore[operator]
            yield response

    def FetchX509SVID(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        self._check_header(context)
        yield from self._stream(context, self._x509_response)

    def FetchX509Bundles(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        self._check_header(context)

        def build() -> workload_pb2.X509BundlesResponse:
            bundles = {f"spiffe://{self.ca.trust_domain}": self.ca.ca_cert.public_bytes(_DER)}
            bundles.update({f"spiffe://{td}": ca.ca_cert.public_bytes(_DER) for td, ca in self.federated.items()})
            return workload_pb2.X509BundlesResponse(bundles=bundles)

        yield from self._stream(context, build)

    def FetchJWTBundles(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        self._check_header(context)
        import json

        def build() -> workload_pb2.JWTBundlesResponse:
            if self.jwt_documents is not None:
                return workload_pb2.JWTBundlesResponse(
                    bundles={f"spiffe://{td}": data for td, data in self.jwt_documents.items()}
                )
            bundles = {
                f"spiffe://{td}": json.dumps(ca.jwt_bundle()).encode()
                for td, ca in [(self.ca.trust_domain, self.ca), *self.federated.items()]
            }
            return workload_pb2.JWTBundlesResponse(bundles=bundles)

        yield from self._stream(context, build)


class SecretDiscovery(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Envoy's SDS (``envoy.service.secret.v3``) on the same socket, as the SPIRE agent serves it.

    Resource ``default``: the workload's X.509-SVID as a ``tls_certificate``; ``ALL``: a
    validation context with Envoy's SPIFFE certificate validator holding every trust domain's
    bundle (SPIRE's behaviour unless ``disable_spiffe_cert_validation``); a trust domain name
    (``spiffe://td``) gives that domain's bundle alone. Rotations are pushed on open streams.
    """

    def __init__(self, api: WorkloadApiServer) -> None:
        self.api = api
        self.requests: list[list[str]] = []

    def _secret(self, name: str) -> Any:
        api = self.api
        pem = serialization.Encoding.PEM
        if name == "default":
            key = api.key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            return secret_pb2.Secret(
                name=name,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(
                        inline_bytes=b"".join(c.public_bytes(pem) for c in api.chain)
                    ),
                    private_key=base_pb2.DataSource(inline_bytes=key),
                ),
            )
        cas = {api.ca.trust_domain: api.ca, **api.federated}
        if name != "ALL":
            cas = {td: ca for td, ca in cas.items() if f"spiffe://{td}" == name}
        validator = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
            trust_domains=[
                tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                    name=td, trust_bundle=base_pb2.DataSource(inline_bytes=ca.ca_cert.public_bytes(pem))
                )
                for td, ca in sorted(cas.items())
            ]
        )
        typed = any_pb2.Any()
        typed.Pack(validator)
        return secret_pb2.Secret(
            name=name,
            validation_context=common_pb2.CertificateValidationContext(
                custom_validator_config=extension_pb2.TypedExtensionConfig(
                    name="envoy.tls.cert_validator.spiffe", typed_config=typed
                )
            ),
        )

    def StreamSecrets(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first = next(request_iterator, None)
        if first is None:
            return
        names = list(first.resource_names)
        self.requests.append(names)

        def drain() -> None:  # Envoy's ACKs; the stream's end shows up as an RpcError here
            try:
                for _ in request_iterator:
                    pass
            except grpc.RpcError:
                pass

        threading.Thread(target=drain, daemon=True).start()
        api, seen = self.api, -1
        while True:
            with api._cond:
                while seen == api.generation and not api._stopping and context.is_active():
                    api._cond.wait(0.2)
                if api._stopping or not context.is_active():
                    return
                seen = api.generation
                resources = []
                for name in names:
                    packed = any_pb2.Any()
                    packed.Pack(self._secret(name))
                    resources.append(packed)
            yield discovery_pb2.DiscoveryResponse(
                version_info=str(seen), resources=resources, type_url=_SECRET_TYPE, nonce=str(seen)
            )


def serve_sds(api: WorkloadApiServer) -> SecretDiscovery:
    """Add Envoy's SDS to ``api``'s server (call before :meth:`WorkloadApiServer.start`)."""
    sds = SecretDiscovery(api)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, api._server)
    return sds
