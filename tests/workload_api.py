"""A SPIFFE Workload API server for tests, speaking the real ``workload.proto`` over a Unix socket.

It stands in for a SPIRE agent (which cannot run here): it serves X.509-SVID and JWT bundle streams
from dev CAs, insists on the ``workload.spiffe.io: true`` security header as SPIRE does, and can
rotate the SVID, pushing the new one to every open stream. py-spiffe ships the generated stubs.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.identity.devca import DevCA

_DER = serialization.Encoding.DER


class WorkloadApiServer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
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
        self._cond = threading.Condition()
        self._stopping = False
        self._issue()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)
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
            bundles = {
                f"spiffe://{td}": json.dumps(ca.jwt_bundle()).encode()
                for td, ca in [(self.ca.trust_domain, self.ca), *self.federated.items()]
            }
            return workload_pb2.JWTBundlesResponse(bundles=bundles)

        yield from self._stream(context, build)
