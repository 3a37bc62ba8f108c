"""How Envoy gets the intercept configuration: file-based SDS against the sidecar's gRPC SDS, and file-based LDS.

Run: ``.venv/bin/python bench/intercept_xds.py [--rotations N] [--hosts N,N,...]``

Real Envoy, real TLS handshakes: a client polls the listener and reads the serial of the
certificate it is served.

* leaf rotation: from "the new leaf is handed over" to "a new handshake gets it" - (1) file-based
  SDS: a secret file per host, written atomically into a watched directory; (2) gRPC SDS: the
  sidecar's :class:`sidecar.tls_intercept.sds.SecretStore` pushing on the open stream;
* many hosts: Envoy with one filter chain and one SDS secret per host, N hosts: time to ready, or
  failure (each file-based SDS subscription takes an inotify instance; Linux allows
  ``fs.inotify.max_user_instances`` - 128 by default - per user, shared by every process of that
  user on the node);
* adding a host with file-based LDS next to N intercepted hosts: from writing the listener file to
  the first handshake for the new name, and the Python cost of rendering it (cached pieces,
  :func:`sidecar.bootstrap.render.render_dynamic`).
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from sidecar.bootstrap.filters import RE2_PROGRAM_SIZE  # noqa: E402
from sidecar.bootstrap.names import InterceptTarget  # noqa: E402
from sidecar.bootstrap.render import render_dynamic  # noqa: E402
from sidecar.config.loader import load_config  # noqa: E402
from sidecar.harness import EnvoyProcess, wait_until  # noqa: E402
from sidecar.tls_intercept.ca import PodCA  # noqa: E402
from sidecar.tls_intercept.files import LISTENER_TYPE, write_resources  # noqa: E402
from sidecar.tls_intercept.sds import SECRET_TYPE_URL, SecretStore  # noqa: E402

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def _chain(host: str, sds_config: dict[str, Any]) -> dict[str, Any]:
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [ROUTER],
    }
    secret = {"name": f"intercept|{host}", "sds_config": sds_config}
    return {
        "filter_chain_match": {"server_names": [host]},
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": TLS_TYPE, "common_tls_context": {"tls_certificate_sds_secret_configs": [secret]}},
        },
    }


def _listener(chains: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "tls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                },
            }
        ],
        "filter_chains": chains,
    }


def _bootstrap(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        **extra,
    }


def _grpc_cluster(name: str, sock: Path) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}],
        },
    }


GRPC_SOURCE = {
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "agent_authz"}}],
    },
    "resource_api_version": "V3",
}


def _file_source(directory: Path) -> dict[str, Any]:
    return {
        "path_config_source": {"path": str(directory / "secret.json"), "watched_directory": {"path": str(directory)}},
        "resource_api_version": "V3",
    }


class _SdsServer:
    """The sidecar's SDS store on a gRPC server of its own, in a thread."""

    def __init__(self, sock: Path) -> None:
        self.store = SecretStore()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((self.store.handler(),))
            server.add_insecure_port(f"unix:{sock}")
            self.store.bind(asyncio.get_running_loop())
            await server.start()
            ready.set()
            await server.wait_for_termination()

        def run() -> None:
            with contextlib.suppress(RuntimeError):  # "Event loop stopped before Future completed": we stop it
                self.loop.run_until_complete(serve())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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
    return x509.load_der_x509_certificate(der).serial_number if der else None


def _served_after(port: int, host: str, serial: int, started: float) -> float:
    """Milliseconds from ``started`` until a handshake for ``host`` is served ``serial``."""
    wait_until(lambda: _serial(port, host) == serial, timeout=30, what=f"{host} served", interval=0.001)
    return (time.perf_counter() - started) * 1000


def _secret_file(directory: Path, ca: PodCA, host: str) -> int:
    """Write ``host``'s SDS file as file-based SDS wants it; returns the leaf's serial."""
    store = SecretStore()
    leaf = ca.issue(host, ttl=600, now=time.time())
    store.put_certificate(f"intercept|{host}", leaf.cert_pem, leaf.key_pem)
    response, _ = store._response([f"intercept|{host}"])
    assert response is not None
    resource = json_format.MessageToDict(response.resources[0])
    directory.mkdir(parents=True, exist_ok=True)
    write_resources(
        directory / "secret.json", SECRET_TYPE_URL, [{k: v for k, v in resource.items() if k != "@type"}], "1", 0o600
    )
    return int(leaf.serial, 16)


def _envoy(work: Path, bootstrap: dict[str, Any]) -> EnvoyProcess:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    envoy = EnvoyProcess(path, log_dir=work)
    envoy.start()
    envoy.wait_ready(60)
    return envoy


def rotation(work: Path, ca: PodCA, rotations: int, transport: str) -> list[float]:
    host = "api.example.com"
    server = _SdsServer(work / f"{transport}.sock") if transport == "grpc" else None
    directory = work / "rot-file" / host
    if server is None:
        _secret_file(directory, ca, host)
        source = _file_source(directory)
        clusters: list[dict[str, Any]] = []
    else:
        leaf = ca.issue(host, ttl=600, now=time.time())
        server.store.put_certificate(f"intercept|{host}", leaf.cert_pem, leaf.key_pem)
        source, clusters = GRPC_SOURCE, [_grpc_cluster("agent_authz", work / f"{transport}.sock")]
    envoy = _envoy(work / f"rot-{transport}", _bootstrap([_listener([_chain(host, source)])], clusters))
    try:
        port = envoy.listener_port("tls")
        times = []
        for _ in range(rotations):
            if server is None:
                started = time.perf_counter()
                serial = _secret_file(directory, ca, host)
            else:
                leaf = ca.issue(host, ttl=600, now=time.time())
                serial = int(leaf.serial, 16)
                started = time.perf_counter()
                server.store.put_certificate(f"intercept|{host}", leaf.cert_pem, leaf.key_pem)
            times.append(_served_after(port, host, serial, started))
        return times
    finally:
        envoy.stop()
        if server is not None:
            server.stop()


def many_hosts(work: Path, ca: PodCA, hosts: int, transport: str) -> str:
    names = [f"h{i}.example.com" for i in range(hosts)]
    base = work / f"many-{transport}-{hosts}"
    server = _SdsServer(base.parent / f"many-{transport}-{hosts}.sock") if transport == "grpc" else None
    chains = []
    for name in names:
        if server is None:
            _secret_file(base / "sds" / name, ca, name)
            chains.append(_chain(name, _file_source(base / "sds" / name)))
        else:
            leaf = ca.issue(name, ttl=600, now=time.time())
            server.store.put_certificate(f"intercept|{name}", leaf.cert_pem, leaf.key_pem)
            chains.append(_chain(name, GRPC_SOURCE))
    clusters = [] if server is None else [_grpc_cluster("agent_authz", base.parent / f"many-{transport}-{hosts}.sock")]
    started = time.perf_counter()
    try:
        envoy = _envoy(base, _bootstrap([_listener(chains)], clusters))
    except (RuntimeError, TimeoutError) as exc:
        reason = "inotify" if "inotify" in str(exc) else str(exc).splitlines()[0][:80]
        if server is not None:
            server.stop()
        return f"{transport} SDS, {hosts} hosts: Envoy failed ({reason})"
    try:
        ready = (time.perf_counter() - started) * 1000
        if _serial(envoy.listener_port("tls"), names[-1]) is None:
            return f"{transport} SDS, {hosts} hosts: ready in {ready:.0f} ms, but no certificate served"
        return f"{transport} SDS, {hosts} hosts: ready in {ready:.0f} ms"
    finally:
        envoy.stop()
        if server is not None:
            server.stop()


def lds_add(work: Path, ca: PodCA, existing: int) -> str:
    """The intercept path as the sidecar runs it: gRPC SDS + file-based LDS rendered with a cache."""
    base = work / f"lds-{existing}"
    (base / "xds").mkdir(parents=True)
    config = {
        "agent": "spiffe://bench.example/ns/a/sa/b",
        "issuer": {"url": "https://bench", "signing_key": "k.pem"},
        "listen": {"authz": f"unix:{base / 'authz.sock'}"},
        "envoy": {"outbound_port": 1},
        "intercept": {"state_dir": str(base / "state"), "publish_dir": str(base / "trust")},
    }
    (base / "sidecar.yaml").write_text(json.dumps(config))
    loaded = load_config(base / "sidecar.yaml")
    server = _SdsServer(base / "authz.sock")
    targets = [InterceptTarget(f"h{i}.example.com", 443, 443) for i in range(existing)]
    new = InterceptTarget("new.example.com", 443, 443)
    cache: dict[Any, dict[str, Any]] = {}

    def listeners(hosts: list[InterceptTarget]) -> list[dict[str, Any]]:
        outbound = render_dynamic(loaded, hosts, cache).listeners[0]
        # direct connections here (no iptables): match on the name alone, without the per-port copies
        outbound["address"]["socketAddress"]["portValue"] = 0
        outbound["listenerFilters"] = [f for f in outbound["listenerFilters"] if "original_dst" not in f["name"]]
        outbound["filterChains"] = [
            c for c in outbound["filterChains"] if not c["name"].startswith("outbound_") or "|" not in c["name"]
        ]
        for chain in outbound["filterChains"]:
            chain.get("filterChainMatch", {}).pop("destinationPort", None)
        return [outbound]

    serial = 0
    for target in [*targets, new]:
        leaf = ca.issue(target.host, ttl=600, now=time.time())
        server.store.put_certificate(f"intercept|{target.host}", leaf.cert_pem, leaf.key_pem)
        serial = int(leaf.serial, 16)
    path = base / "xds" / "listeners.json"
    write_resources(path, LISTENER_TYPE, listeners(targets), "1", 0o600)
    source = {
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
        "resource_api_version": "V3",
    }
    clusters = [_grpc_cluster("agent_authz", base / "authz.sock")] + [
        {"name": n, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": n}}
        for n in (
            "agent_authz_http",
            "intercept_connect",
            "dynamic_forward_proxy",
            "outbound_original_dst",
            "blackhole",
        )
    ]
    # the HTTP checks' answer-header matcher needs the larger RE2 program limit the real bootstrap sets
    runtime = {"layers": [{"name": "bench", "static_layer": {"re2.max_program_size.error_level": RE2_PROGRAM_SIZE}}]}
    envoy = _envoy(base, _bootstrap([], clusters, dynamic_resources={"lds_config": source}, layered_runtime=runtime))
    try:

        def listening() -> bool:
            try:
                envoy.listener_port("outbound")
            except KeyError:  # the LDS listener is still warming (its SDS leaves)
                return False
            return True

        wait_until(listening, timeout=30, what="the LDS listener")
        port = envoy.listener_port("outbound")
        started = time.perf_counter()
        rendered = listeners([*targets, new])
        render_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        write_resources(path, LISTENER_TYPE, rendered, "2", 0o600)
        served = _served_after(port, new.host, serial, started)
        what = f"file LDS + gRPC SDS, add a host next to {existing}"
        return f"{what}: render {render_ms:.0f} ms, served {served:.0f} ms later"
    finally:
        envoy.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--hosts", default="50,200", help="comma-separated host counts for the many-hosts run")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="intercept-xds-"))
    ca = PodCA.create(ttl=3600, now=time.time())
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    print(f"fs.inotify.max_user_instances = {limit.read_text().strip() if limit.exists() else '?'}")
    for transport in ("file", "grpc"):
        times = rotation(work, ca, args.rotations, transport)
        print(
            f"{transport} SDS rotation: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms "
            f"({len(times)} rotations)",
            flush=True,
        )
    for hosts in (int(n) for n in args.hosts.split(",")):
        for transport in ("file", "grpc"):
            print(many_hosts(work, ca, hosts, transport), flush=True)
    for existing in (1, 100):
        print(lds_add(work, ca, existing), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
