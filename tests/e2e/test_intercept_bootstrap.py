"""The rendered intercept configuration: static bootstrap, dynamic listeners and clusters; Envoy takes them."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar.bootstrap.names import InterceptTarget
from sidecar.bootstrap.render import render_dynamic, write_envoy
from sidecar.config.loader import load_config
from sidecar.envoy_bin import find_envoy
from sidecar.harness import AuthzStack, wait_until
from sidecar.runtime import Runtime
from sidecar.tls_intercept.manager import InterceptManager
from sidecar.tls_intercept.sds import SecretStore
from tests.support.config import base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e

API, ALT = "api.example.com", "alt.example.com"
RULES = [
    {"name": "api", "host": API, "tls": "intercept", "methods": ["GET"], "paths": ["*"]},
    {
        "name": "alt",
        "host": ALT,
        "tls": "intercept",
        "port": 8443,
        "upstream_port": 9443,
        "methods": ["GET"],
        "paths": ["*"],
    },
    {"name": "pass", "host": "pass.example.com", "tls": "passthrough"},
]
TARGETS = [InterceptTarget(API, 443, 443), InterceptTarget(ALT, 8443, 9443)]


def _config(tmp_path: Path, **envoy: Any) -> Path:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=RULES)], {API: "10.0.0.2:80"})
    config["envoy"].update(envoy)
    config["envoy"]["upstream_ca"] = "/etc/ssl/certs/ca-certificates.crt"
    config["intercept"] = {"state_dir": "state", "publish_dir": "trust"}
    return write_config(tmp_path, config)


def _typed(filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f["typedConfig"] for f in filters]


def test_static_bootstrap(tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    write_envoy(load_config(_config(tmp_path, outbound_port=15001)), out)
    bootstrap = json.loads(out.read_text())
    static = bootstrap["staticResources"]
    assert [listener["name"] for listener in static["listeners"]] == ["egress_http"]  # outbound is dynamic
    state = tmp_path / "state"
    for kind, file in (("ldsConfig", "listeners.json"), ("cdsConfig", "clusters.json")):
        source = bootstrap["dynamicResources"][kind]["pathConfigSource"]
        assert source == {"path": str(state / "xds" / file), "watchedDirectory": {"path": str(state / "xds")}}
    assert bootstrap["bootstrapExtensions"][0]["name"] == "envoy.bootstrap.internal_listener"
    clusters = {c["name"]: c for c in static["clusters"]}
    endpoint = clusters["intercept_connect"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
    assert endpoint["address"] == {"envoyInternalAddress": {"serverListenerName": "intercept_connect"}}
    assert {"outbound_original_dst", "blackhole"} <= set(clusters)
    (manager,) = _typed(static["listeners"][0]["filterChains"][0]["filters"])
    assert manager["upgradeConfigs"] == [{"upgradeType": "CONNECT"}]
    assert manager["httpProtocolOptions"] == {"acceptHttp10": True}  # Python's http.client tunnels with HTTP/1.0
    for virtual_host in manager["routeConfig"]["virtualHosts"]:  # a CONNECT is decided wherever it is routed
        route = virtual_host["routes"][0]
        assert route["match"] == {"connectMatcher": {}} and route["route"]["cluster"] == "intercept_connect"
        check = route["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]
        assert "disabled" not in check and check["checkSettings"]["contextExtensions"] == {"direction": "egress"}
    filters = {f["name"]: f["typedConfig"] for f in manager["httpFilters"]}
    state_filter = filters["envoy.filters.http.set_filter_state"]["onRequestHeaders"][0]
    assert state_filter["objectKey"] == "agent_authz.connect" and state_filter["sharedWithUpstream"] == "ONCE"
    _write_dynamic(tmp_path / "sidecar.yaml")  # the bootstrap names these files: Envoy refuses to start without them
    result = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _write_dynamic(path: Path) -> InterceptManager:
    """What the sidecar writes at start: the CA, the trust files, the secrets and the LDS/CDS files."""
    manager = InterceptManager(load_config(path), SecretStore())
    manager.prepare()
    runtime = Runtime(path)
    manager.sync(runtime.snapshot.policy, runtime.clock())
    return manager


def test_dynamic_listeners_and_clusters(tmp_path: Path) -> None:
    dynamic = render_dynamic(load_config(_config(tmp_path, outbound_port=15001)), TARGETS)
    outbound, connect = dynamic.listeners
    chains = {c["name"]: c for c in outbound["filterChains"]}
    assert list(chains) == [
        f"intercept|{ALT}:8443",
        f"intercept|{API}:443",
        "outbound_tls|443",
        "outbound_http|443",
        "outbound_tls|8443",
        "outbound_http|8443",
        "outbound_tls",
        "outbound_http",
    ]  # Envoy matches the port first: each intercepted port keeps passthrough and plain HTTP
    api = chains[f"intercept|{API}:443"]
    assert api["filterChainMatch"] == {"destinationPort": 443, "serverNames": [API], "transportProtocol": "tls"}
    context = api["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert context["alpnProtocols"] == ["h2", "http/1.1"]
    (sds,) = context["tlsCertificateSdsSecretConfigs"]
    assert sds["name"] == f"intercept|{API}"
    assert sds["sdsConfig"]["apiConfigSource"] == {  # gRPC SDS from the sidecar: no key on disk
        "apiType": "GRPC",
        "transportApiVersion": "V3",
        "grpcServices": [  # re-opened within 250 ms: Envoy may start before the sidecar listens
            {
                "envoyGrpc": {
                    "clusterName": "agent_authz",
                    "retryPolicy": {"retryBackOff": {"baseInterval": "0.025s", "maxInterval": "0.250s"}},
                }
            }
        ],
    }
    (manager,) = _typed(api["filters"])
    assert manager["routeConfig"]["validateClusters"] is False
    assert [f["name"] for f in manager["httpFilters"]] == [
        "agent_authz.strip_reserved",  # HTTP checks (the default): the client's own x-agent-authz-* removed
        "envoy.filters.http.header_mutation",  # the CONNECT authority, before ext_authz reads the headers
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    mutations = manager["httpFilters"][1]["typedConfig"]["mutations"]["requestMutations"]
    assert mutations[0] == {"remove": "x-agent-authz-connect"}  # whatever the agent sent is gone first
    assert mutations[1]["append"]["header"]["value"] == "%FILTER_STATE(agent_authz.connect:PLAIN)%"
    allowed, misdirected = manager["routeConfig"]["virtualHosts"]
    assert allowed["domains"] == [API, f"{API}:443"]
    assert allowed["routes"][0]["route"]["cluster"] == f"intercept|{API}|443"
    extensions = allowed["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]["contextExtensions"]
    assert extensions == {
        "direction": "egress",
        "intercept": f"{API}:443",
        "upstream_verify": f"dns:{API} ca:/etc/ssl/certs/ca-certificates.crt",
    }
    assert misdirected["domains"] == ["*"] and misdirected["routes"][0]["directResponse"]["status"] == 421
    (mapper,) = manager["localReplyConfig"]["mappers"]
    assert mapper["filter"]["responseFlagFilter"]["flags"] == ["UF"] and mapper["statusCode"] == 502
    assert "%UPSTREAM_TRANSPORT_FAILURE_REASON%" in json.dumps(manager["accessLog"])
    assert chains[f"intercept|{ALT}:8443"]["filterChainMatch"]["destinationPort"] == 8443
    # the CONNECT listener: port-443 targets only, anything else asked about and closed
    assert connect["name"] == "intercept_connect" and "internalListener" in connect
    assert [c["name"] for c in connect["filterChains"]] == [f"intercept|{API}:443"]
    assert "destinationPort" not in connect["filterChains"][0]["filterChainMatch"]
    check, proxy = _typed(connect["defaultFilterChain"]["filters"])
    assert {"key": "x-agent-authz-via", "value": "connect"} in check["grpcService"]["initialMetadata"]
    assert proxy["cluster"] == "blackhole"
    clusters = {c["name"]: c for c in dynamic.clusters}
    assert set(clusters) == {f"intercept|{API}|443", f"intercept|{ALT}|9443"}
    api_cluster = clusters[f"intercept|{API}|443"]
    address = api_cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
    assert address == {"address": "10.0.0.2", "portValue": 443} and api_cluster["type"] == "STATIC"
    tls = api_cluster["transportSocket"]["typedConfig"]
    assert tls["sni"] == API
    validation = tls["commonTlsContext"]["validationContext"]
    assert validation["trustedCa"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
    assert validation["matchTypedSubjectAltNames"] == [{"sanType": "DNS", "matcher": {"exact": API}}]
    options = api_cluster["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert set(options["autoConfig"]) == {"httpProtocolOptions", "http2ProtocolOptions"}
    alt = clusters[f"intercept|{ALT}|9443"]
    assert alt["type"] == "STRICT_DNS"  # no static address: resolved by name, never the original destination
    assert alt["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"] == {
        "address": ALT,
        "portValue": 9443,
    }


def test_render_is_deterministic(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path, outbound_port=15001))
    assert render_dynamic(loaded, TARGETS) == render_dynamic(loaded, list(reversed(TARGETS)))


def test_envoy_loads_the_dynamic_listeners_and_the_secrets_from_the_sidecar(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port for the outbound listener (0 is refused: iptables names it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = _config(tmp_path, outbound_port=port)
    stack = AuthzStack(path, tmp_path)
    try:
        stack.start()
        envoy = stack.envoy
        for stat in ("listener_manager.lds.update_success", "cluster_manager.cds.update_success"):
            assert envoy.stat(stat) >= 1, stat
        for stat in ("listener_manager.lds.update_rejected", "cluster_manager.cds.update_rejected"):
            assert envoy.stat(stat) == 0, envoy.log_tail()
        for host in (API, ALT):  # both listeners' chains took their leaf from the sidecar's gRPC SDS
            wait_until(lambda h=host: envoy.stat(f"sds.intercept|{h}.update_success") >= 1, timeout=10, what=host)
        status, body = envoy.admin("/listeners")
        assert status == 200 and {"egress_http", "outbound", "intercept_connect"} <= {
            line.split("::")[0] for line in body.decode().splitlines()
        }
        assert envoy.stat("listener_manager.total_listeners_warming") == 0
    finally:
        stack.stop()
