"""Envoy's gRPC xDS streams (the SDS of the ingress certificate and of the intercepted hosts' leaves)
re-open with a short back-off: Envoy may start before the socket it streams from exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.bootstrap.names import AUTHZ_CLUSTER, SPIRE_CLUSTER, InterceptTarget
from sidecar.bootstrap.render import render_dynamic, render_envoy
from sidecar.config.loader import load_config
from sidecar.wire import intercept_secret_name
from tests.support.config import base_config, task, write_config, write_keys

API = "api.example.com"
RETRY = {"retryBackOff": {"baseInterval": "0.025s", "maxInterval": "0.250s"}}


def _config(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    rules = [{"name": "api", "host": API, "tls": "intercept", "methods": ["GET"], "paths": ["*"]}]
    config = base_config(tmp_path, [task(egress=rules)], {API: "10.0.0.2:443"})
    config["envoy"].update({"outbound_port": 15001, "local_app": "127.0.0.1:8080"})
    config["identity"] = {"source": "workload_api", "workload_api": {"socket": "unix:///run/spire/agent.sock"}}
    config["intercept"] = {"state_dir": "state", "publish_dir": "trust"}
    return write_config(tmp_path, config)


def _grpc_sources(node: Any) -> list[dict[str, Any]]:
    """Every ``apiConfigSource`` in ``node`` (a rendered resource) that streams over gRPC."""
    found = []
    if isinstance(node, dict):
        source = node.get("apiConfigSource")
        if isinstance(source, dict) and source.get("apiType") == "GRPC":
            found.append(source)
        for value in node.values():
            found += _grpc_sources(value)
    elif isinstance(node, list):
        for value in node:
            found += _grpc_sources(value)
    return found


def _sds_of(chain: dict[str, Any]) -> list[dict[str, Any]]:
    context = chain["transportSocket"]["typedConfig"]["commonTlsContext"]
    return [*context.get("tlsCertificateSdsSecretConfigs", []), context.get("validationContextSdsSecretConfig", {})]


def test_every_grpc_xds_source_retries_within_a_quarter_second(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path))
    bootstrap = render_envoy(loaded).bootstrap
    dynamic = render_dynamic(loaded, [InterceptTarget(API, 443, 443)])
    sources = _grpc_sources(bootstrap) + _grpc_sources(dynamic.listeners) + _grpc_sources(dynamic.clusters)
    assert len(sources) == 2 + 2  # the ingress SVID and bundle; the leaf on outbound and on intercept_connect
    for source in sources:
        (service,) = source["grpcServices"]
        assert service["envoyGrpc"]["retryPolicy"] == RETRY, service


def test_the_ingress_sds_streams_from_the_spire_agent_with_the_retry_policy(tmp_path: Path) -> None:
    bootstrap = render_envoy(load_config(_config(tmp_path))).bootstrap
    (ingress,) = [item for item in bootstrap["staticResources"]["listeners"] if item["name"] == "ingress_https"]
    secrets = [secret for chain in ingress["filterChains"] for secret in _sds_of(chain)]
    assert {secret["name"] for secret in secrets} == {"default", "ALL"}
    for secret in secrets:
        (service,) = secret["sdsConfig"]["apiConfigSource"]["grpcServices"]
        assert service["envoyGrpc"] == {"clusterName": SPIRE_CLUSTER, "retryPolicy": RETRY}


def test_the_intercept_leaf_streams_from_the_sidecar_with_the_retry_policy(tmp_path: Path) -> None:
    dynamic = render_dynamic(load_config(_config(tmp_path)), [InterceptTarget(API, 443, 443)])
    chains = [
        chain
        for listener in dynamic.listeners
        for chain in listener["filterChains"]
        if chain["name"].startswith("intercept|")
    ]
    assert len(chains) == 2  # outbound (the port matched) and intercept_connect
    for chain in chains:
        (secret,) = chain["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
        assert secret["name"] == intercept_secret_name(API)
        (service,) = secret["sdsConfig"]["apiConfigSource"]["grpcServices"]
        assert service["envoyGrpc"] == {"clusterName": AUTHZ_CLUSTER, "retryPolicy": RETRY}
