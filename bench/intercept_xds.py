"""How fast Envoy picks up what the intercept manager hands it: file-based SDS/LDS against a gRPC SDS server.

Run: ``.venv/bin/python bench/intercept_xds.py [--rotations N]``

Measures, with real Envoy and real TLS handshakes (a client polls the listener and reads the
serial of the certificate it is served):

* leaf rotation latency: from "the new leaf is handed over" to "a new handshake gets it" -
  (1) file-based SDS: the sidecar's own code path (``write_resources`` of an SDS file, atomic
  rename into the watched directory); (2) gRPC SDS: a minimal state-of-the-world
  ``SecretDiscoveryService`` served from Python (grpc.aio, ``xds-protos`` classes) pushing the new
  secret on the open stream;
* adding an intercepted host with file-based LDS: from writing the listener file (with N chains
  already there) to the first successful handshake for the new name, and the Python cost of
  rendering the listeners (:func:`sidecar.bootstrap.render.render_dynamic`).

The figures chose file-based xDS for ``intercept`` (see the README's "Intercepting HTTPS").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

from sidecar.bootstrap.render import render_leaf_secret  # noqa: E402
from sidecar.intercept.ca import PodCA  # noqa: E402
from sidecar.intercept.files import SECRET_TYPE, write_resources  # noqa: E402
from sidecar.procs import EnvoyProcess, wait_until  # noqa: E402

HOST = "api.example.com"


def _tls_listener(name: str, sds_config: dict[str, Any], server_names: list[str] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                    ".HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                            }
                        ]
                    },
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                            },
                        }
                    ],
                },
            }
        ],
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": f"leaf|{name}", "sds_config": sds_config}]
                },
            },
        },
    }
    if server_names:
        chain["filter_chain_match"] = {"server_names": server_names}
    return chain


def _bootstrap(listeners: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    none = {"name": "none", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": "none"}}
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": [none, *extra.pop("clusters", [])]},
        **extra,
    }


def _serial(port: int, host: str) -> int | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number if der else None


def _until_served(port: int, host: str, serial: int, started: float | None = None) -> float:
    """Milliseconds from ``started`` (default: now) until a handshake is served ``serial``."""
    started = time.perf_counter() if started is None else started
    wait_until(lambda: _serial(port, host) == serial, timeout=10, what="the new certificate", interval=0.001)
    return (time.perf_counter() - started) * 1000


def _secret(ca: PodCA, host: str, name: str) -> tuple[dict[str, Any], int]:
    leaf = ca.issue(host, ttl=600, now=time.time())
    return render_leaf_secret(name, leaf.cert_pem, leaf.key_pem), int(leaf.serial, 16)


def file_sds(work: Path, ca: PodCA, rotations: int) -> list[float]:
    secret_dir = work / "file" / "sds"
    secret_dir.mkdir(parents=True)
    path = secret_dir / "secret.json"
    secret, _ = _secret(ca, HOST, "leaf|file")
    write_resources(path, SECRET_TYPE, [secret], "0", 0o600)
    source = {"path_config_source": {"path": str(path), "watched_directory": {"path": str(secret_dir)}}}
    listener = {
        "name": "file",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [_tls_listener("file", source)],
    }
    envoy = _envoy(work / "file", _bootstrap([listener], {}))
    try:
        port = envoy.listener_port("file")
        times = []
        for i in range(rotations):
            secret, serial = _secret(ca, HOST, "leaf|file")
            started = time.perf_counter()
            write_resources(path, SECRET_TYPE, [secret], str(i + 1), 0o600)
            times.append(_until_served(port, HOST, serial, started))
        return times
    finally:
        envoy.stop()


class _Sds:
    """A minimal state-of-the-world SDS server: the current secret, pushed to every open stream."""

    def __init__(self) -> None:
        self.secret: secret_pb2.Secret | None = None
        self.version = 0
        self.streams: list[asyncio.Queue[None]] = []

    def set(self, secret: dict[str, Any]) -> None:
        from google.protobuf import json_format

        self.secret = json_format.ParseDict(secret, secret_pb2.Secret())
        self.version += 1
        for queue in self.streams:
            queue.put_nowait(None)

    def response(self) -> discovery_pb2.DiscoveryResponse:
        response = discovery_pb2.DiscoveryResponse(version_info=str(self.version), nonce=str(self.version))
        response.type_url = SECRET_TYPE
        assert self.secret is not None
        response.resources.add().Pack(self.secret)
        return response

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], _: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        queue: asyncio.Queue[None] = asyncio.Queue()
        self.streams.append(queue)
        first = await anext(requests)
        assert first.type_url == SECRET_TYPE
        reader = asyncio.ensure_future(self._drain(requests))
        try:
            yield self.response()
            while True:
                await queue.get()
                yield self.response()
        finally:
            reader.cancel()
            self.streams.remove(queue)

    @staticmethod
    async def _drain(requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        async for _ in requests:  # ACKs
            pass


def grpc_sds(work: Path, ca: PodCA, rotations: int) -> list[float]:
    (work / "grpc").mkdir()
    sock = work / "grpc" / "sds.sock"
    sds = _Sds()
    secret, _ = _secret(ca, HOST, "leaf|grpc")
    sds.set(secret)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    servers: list[grpc.aio.Server] = []

    async def serve() -> None:
        server = grpc.aio.server()
        servers.append(server)
        handler = grpc.stream_stream_rpc_method_handler(
            sds.stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "envoy.service.secret.v3.SecretDiscoveryService", {"StreamSecrets": handler}
                ),
            )
        )
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    def run() -> None:
        with contextlib.suppress(RuntimeError):  # "Event loop stopped before Future completed": we stop it
            loop.run_until_complete(serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    source = {
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds"}}],
        },
        "resource_api_version": "V3",
    }
    listener = {
        "name": "grpc",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [_tls_listener("grpc", source)],
    }
    cluster = {
        "name": "sds",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "sds",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}],
        },
    }
    envoy = _envoy(work / "grpc", _bootstrap([listener], {"clusters": [cluster]}))
    try:
        port = envoy.listener_port("grpc")
        times = []
        for _ in range(rotations):
            secret, serial = _secret(ca, HOST, "leaf|grpc")
            started = time.perf_counter()
            loop.call_soon_threadsafe(sds.set, secret)
            times.append(_until_served(port, HOST, serial, started))
        return times
    finally:
        envoy.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def file_lds(work: Path, ca: PodCA, existing: int) -> tuple[float, float]:
    """(ms to serve a newly added name with ``existing`` chains in place, ms to render them in Python)."""
    from sidecar.bootstrap.render import render_dynamic
    from sidecar.config.loader import load_config
    from sidecar.intercept.targets import InterceptTarget

    base = work / f"lds-{existing}"
    (base / "xds").mkdir(parents=True)
    config = {
        "agent": "spiffe://bench.example/ns/a/sa/b",
        "issuer": {"url": "https://bench", "signing_key": "k.pem"},
        "listen": {"authz": "127.0.0.1:9"},
        "envoy": {"outbound_port": 1},
        "intercept": {"state_dir": str(base), "publish_dir": str(work / f"trust-{existing}")},
    }
    (base / "sidecar.yaml").write_text(json.dumps(config))
    loaded = load_config(base / "sidecar.yaml")
    targets = [InterceptTarget(f"h{i}.example.com", 443, 443) for i in range(existing)]

    def render(hosts: list[InterceptTarget]) -> tuple[list[dict[str, Any]], float]:
        started = time.perf_counter()
        (outbound, _) = render_dynamic(loaded, hosts).listeners
        outbound["address"]["socketAddress"]["portValue"] = 0
        # direct connections here (no iptables): match on the name alone, drop the per-port copies
        outbound["listenerFilters"] = [f for f in outbound["listenerFilters"] if "original_dst" not in f["name"]]
        outbound["filterChains"] = [
            c for c in outbound["filterChains"] if not c["name"].startswith("outbound_") or "|" not in c["name"]
        ]
        for chain in outbound["filterChains"]:
            chain.get("filterChainMatch", {}).pop("destinationPort", None)
        return [outbound], (time.perf_counter() - started) * 1000

    for target in [*targets, InterceptTarget("new.example.com", 443, 443)]:
        secret, _ = _secret(ca, target.host, f"intercept|{target.host}")
        (base / "sds" / target.host).mkdir(parents=True)
        write_resources(base / "sds" / target.host / "secret.json", SECRET_TYPE, [secret], "1", 0o600)
    listeners, _ = render(targets)
    write_resources(
        base / "xds" / "listeners.json", "type.googleapis.com/envoy.config.listener.v3.Listener", listeners, "1", 0o600
    )
    watched = {
        "path_config_source": {
            "path": str(base / "xds" / "listeners.json"),
            "watched_directory": {"path": str(base / "xds")},
        }
    }
    bootstrap = _bootstrap([], {"dynamic_resources": {"lds_config": {**watched, "resource_api_version": "V3"}}})
    for name in ("agent_authz", "dynamic_forward_proxy", "outbound_original_dst", "blackhole"):
        bootstrap["static_resources"]["clusters"].append(
            {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": name}}
        )
    envoy = _envoy(base, bootstrap)
    try:
        port = envoy.listener_port("outbound")
        serial = None
        listeners, render_ms = render([*targets, InterceptTarget("new.example.com", 443, 443)])
        expected = json.loads((base / "sds" / "new.example.com" / "secret.json").read_text())["resources"][0]
        import base64

        from cryptography import x509

        cert = base64.b64decode(expected["tlsCertificate"]["certificateChain"]["inlineBytes"])
        serial = x509.load_pem_x509_certificate(cert).serial_number
        started = time.perf_counter()
        write_resources(
            base / "xds" / "listeners.json",
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            listeners,
            "2",
            0o600,
        )
        wait_until(lambda: _serial(port, "new.example.com") == serial, timeout=30, what="new chain", interval=0.002)
        return (time.perf_counter() - started) * 1000, render_ms
    finally:
        envoy.stop()


def _envoy(work: Path, bootstrap: dict[str, Any]) -> EnvoyProcess:
    path = work / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    envoy = EnvoyProcess(path, log_dir=work)
    envoy.start()
    envoy.wait_ready(30)
    return envoy


def _summary(name: str, times: list[float]) -> str:
    return f"{name}: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms ({len(times)} rotations)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotations", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="intercept-xds-"))
    ca = PodCA.create(ttl=3600, now=time.time())
    measurements: list[tuple[str, Callable[[], str]]] = [
        ("file SDS", lambda: _summary("file-based SDS rotation", file_sds(work, ca, args.rotations))),
        ("gRPC SDS", lambda: _summary("gRPC SDS rotation", grpc_sds(work, ca, args.rotations))),
    ]
    for existing in (1, 100, 500):

        def lds(n: int = existing) -> str:
            served, rendered = file_lds(work, ca, n)
            return f"file-based LDS, add a host next to {n}: served after {served:.1f} ms; render {rendered:.0f} ms"

        measurements.append((f"LDS {existing}", lds))
    for _, run in measurements:
        print(run(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
