"""The rendered interception bootstrap: listeners, filter chains, clusters; Envoy accepts it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar.bootstrap.render import write_envoy
from sidecar.config.loader import load_config
from sidecar.envoy_bin import find_envoy
from tests.support.config import add_file_identity, base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e

RULES = [
    {"name": "api", "host": "api.example.com", "methods": ["GET"], "paths": ["*"]},
    {"name": "tls", "host": "*.secure.example.com", "tls": "passthrough"},
    {"name": "vault", "host": "vault.example.com", "methods": ["GET"], "paths": ["*"], "tls": "originate"},
]


def _render(tmp_path: Path, **envoy: Any) -> dict[str, Any]:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=RULES)], {"api.example.com": "10.0.0.2:80"})
    add_file_identity(tmp_path, config, local_app="127.0.0.1:8080")
    config["envoy"].update(ingress_port=15006, **envoy)
    write_config(tmp_path, config)
    out = tmp_path / "envoy.json"
    write_envoy(load_config(tmp_path / "sidecar.yaml"), out)
    result = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(out.read_text()))


def _listener(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    (listener,) = [item for item in bootstrap["staticResources"]["listeners"] if item["name"] == name]
    return dict(listener)


def test_outbound_listener(tmp_path: Path) -> None:
    bootstrap = _render(tmp_path, outbound_port=15001, ipv6=True)
    outbound = _listener(bootstrap, "outbound")
    assert outbound["address"]["socketAddress"] == {"address": "127.0.0.1", "portValue": 15001}
    assert outbound["additionalAddresses"][0]["address"]["socketAddress"]["address"] == "::1"
    assert [f["name"] for f in outbound["listenerFilters"]] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
        "envoy.filters.listener.http_inspector",
    ]
    chains = {c["name"]: c for c in outbound["filterChains"]}
    tls = chains["outbound_tls"]
    assert tls["filterChainMatch"] == {"transportProtocol": "tls"}
    check, proxy = (f["typedConfig"] for f in tls["filters"])
    assert check["includeTlsSession"] is True and check.get("failureModeAllow", False) is False
    assert {"key": "x-agent-authz-protocol", "value": "tls"} in check["grpcService"]["initialMetadata"]
    assert proxy["cluster"] == "outbound_original_dst" and proxy["upstreamConnectMode"] == "ON_DOWNSTREAM_DATA"
    http = chains["outbound_http"]["filters"][0]["typedConfig"]
    domains = {d for vhost in http["routeConfig"]["virtualHosts"] for d in vhost["domains"]}
    assert {"api.example.com", "vault.example.com", "*"} <= domains
    default = outbound["defaultFilterChain"]["filters"]
    assert {"key": "x-agent-authz-protocol", "value": "tcp"} in default[0]["typedConfig"]["grpcService"][
        "initialMetadata"
    ]
    assert default[1]["typedConfig"]["cluster"] == "blackhole"
    clusters = {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}
    assert clusters["outbound_original_dst"]["type"] == "ORIGINAL_DST"
    assert "endpoints" not in clusters["blackhole"].get("loadAssignment", {})


def test_originate_route_and_cluster(tmp_path: Path) -> None:
    bootstrap = _render(tmp_path)
    egress = _listener(bootstrap, "egress_http")
    vhosts = egress["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"]
    (vault,) = [v for v in vhosts if "vault.example.com" in v["domains"]]
    context = vault["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]["contextExtensions"]
    assert context == {"direction": "egress", "upstream_tls": "originate"}
    (cluster,) = [
        c for c in bootstrap["staticResources"]["clusters"] if c["name"] == vault["routes"][-1]["route"]["cluster"]
    ]
    socket = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
    assert socket == {"address": "vault.example.com", "portValue": 443}
    tls = cluster["transportSocket"]["typedConfig"]
    assert tls["sni"] == "vault.example.com"
    validation = tls["commonTlsContext"]["validationContext"]
    assert validation["trustedCa"]["filename"] == "/etc/ssl/certs/ca-certificates.crt"
    assert validation["matchTypedSubjectAltNames"][0]["matcher"] == {"exact": "vault.example.com"}
    # no outbound listener unless asked for
    assert all(item["name"] != "outbound" for item in bootstrap["staticResources"]["listeners"])


def test_inbound_redirect(tmp_path: Path) -> None:
    ingress = _listener(_render(tmp_path, inbound_redirect=True), "ingress_https")
    assert [f["name"] for f in ingress["listenerFilters"]] == ["envoy.filters.listener.original_dst"]
    direct, redirected = ingress["filterChains"]
    assert direct["filterChainMatch"] == {"destinationPort": 15006}
    assert "filterChainMatch" not in redirected
    for chain in (direct, redirected):
        assert chain["transportSocket"]["typedConfig"]["requireClientCertificate"] is True
    vhost = redirected["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"][0]
    assert vhost["requestHeadersToAdd"][0]["header"] == {
        "key": "x-agent-authz-inbound-dst",
        "value": "127.0.0.1:%DOWNSTREAM_LOCAL_PORT%",
    }
