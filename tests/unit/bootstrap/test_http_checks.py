"""The rendering of HTTP checks (``envoy.authz_transport: http``): Envoy's HTTP service, the route
context in route metadata, the answer-header matcher - and gRPC where only it works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import re2

from sidecar import wire
from sidecar.bootstrap.filters import reserved_header_regex, upstream_header_regex
from sidecar.bootstrap.render import render_envoy
from sidecar.config.loader import load_config
from tests.support.config import base_config, task, write_config, write_keys

MCP_RULE = {"host": "mcp.internal", "protocol": "mcp", "paths": ["/mcp"], "tools": ["query"]}
PLAIN_RULE = {"host": "api.internal", "methods": ["GET"], "paths": ["/v1/*"]}


def _bootstrap(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    write_keys(tmp_path)
    config = base_config(
        tmp_path, [task(egress=[MCP_RULE, PLAIN_RULE])], {"mcp.internal": "127.0.0.1:1", "api.internal": "127.0.0.1:2"}
    )
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    return render_envoy(load_config(write_config(tmp_path, config))).bootstrap


def _managers(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typedConfig"]
        for listener in bootstrap["staticResources"]["listeners"]
        for chain in listener["filterChains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]


def test_http_checks_go_to_the_http_service_on_its_own_socket(tmp_path: Path) -> None:
    bootstrap = _bootstrap(tmp_path, envoy={"outbound_port": 15001, "egress_port": 15080})
    clusters = {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}
    pipe = clusters["agent_authz_http"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert pipe == {"pipe": {"path": str(tmp_path / "authz-http.sock")}}  # beside authz.sock, same directory
    assert "typedExtensionProtocolOptions" not in clusters["agent_authz_http"]  # HTTP/1.1
    managers = _managers(bootstrap)
    assert len(managers) == 2  # egress_http and outbound_http
    for manager in managers:
        first, authz = manager["httpFilters"][:2]
        # the client's own x-agent-authz-* removed before anything reads the request
        (strip,) = first["typedConfig"]["mutations"]["requestMutations"]
        assert strip == {"removeOnMatch": {"keyMatcher": {"prefix": "x-agent-authz-"}}}
        assert authz["name"] == wire.HTTP_FILTER
        config = authz["typedConfig"]
        assert "grpcService" not in config and not config.get("failureModeAllow", False)
        service = config["httpService"]
        assert service["serverUri"]["cluster"] == "agent_authz_http" and service["pathPrefix"] == wire.HTTP_CHECK_PREFIX
        added = {h["key"]: h["value"] for h in service["authorizationRequest"]["headersToAdd"]}
        assert added == {
            wire.CONTEXT_HEADER: "%METADATA(ROUTE:envoy.filters.http.ext_authz)%",
            wire.SCHEME_HEADER: "%REQ(:SCHEME)%",
            wire.DESTINATION_HEADER: "%DOWNSTREAM_LOCAL_ADDRESS%",
            wire.PEER_CERTIFICATE_HEADER: "%DOWNSTREAM_PEER_CERT%",
        }
        assert config["disallowedHeaders"] == {"patterns": [{"safeRegex": {"regex": reserved_header_regex()}}]}
        answer = service["authorizationResponse"]
        assert answer["dynamicMetadataFromHeaders"] == {"patterns": [{"exact": k} for k in wire.HTTP_METADATA_KEYS]}
        assert [p["exact"] for p in answer["allowedClientHeaders"]["patterns"]] == [
            "content-type",
            wire.DECISION_ID_HEADER,
            wire.REASON_HEADER,
        ]
        # every route that asks names its context in its metadata, as in its context_extensions
        for vhost in manager["routeConfig"]["virtualHosts"]:
            for route in vhost["routes"]:
                per_filter = route.get("typedPerFilterConfig", vhost.get("typedPerFilterConfig", {}))
                check = per_filter.get(wire.HTTP_FILTER, {})
                if check.get("disabled"):
                    continue
                assert (
                    route["metadata"]["filterMetadata"][wire.HTTP_FILTER] == check["checkSettings"]["contextExtensions"]
                ), vhost["name"]
    # the RE2 program of the answer matcher is over Envoy's default limit, which Envoy checks per request
    layer = bootstrap["layeredRuntime"]["layers"][0]["staticLayer"]
    assert layer == {"re2.max_program_size.error_level": 1024}
    # connection checks, ext_proc and SDS stay on gRPC
    assert clusters["agent_authz"]["typedExtensionProtocolOptions"]


def test_grpc_checks_render_as_before(tmp_path: Path) -> None:
    bootstrap = _bootstrap(tmp_path, envoy={"authz_transport": "grpc"})
    assert "agent_authz_http" not in {c["name"] for c in bootstrap["staticResources"]["clusters"]}
    assert "layeredRuntime" not in bootstrap
    for manager in _managers(bootstrap):
        config = manager["httpFilters"][0]["typedConfig"]
        assert config["grpcService"]["envoyGrpc"]["clusterName"] == "agent_authz" and "httpService" not in config
        assert all("metadata" not in r for v in manager["routeConfig"]["virtualHosts"] for r in v["routes"])


def test_a_tcp_authz_address_without_an_http_one_keeps_grpc(tmp_path: Path) -> None:
    bootstrap = _bootstrap(tmp_path, listen={"authz": "127.0.0.1:9191"})
    assert "agent_authz_http" not in {c["name"] for c in bootstrap["staticResources"]["clusters"]}
    bootstrap = _bootstrap(tmp_path, listen={"authz": "127.0.0.1:9191", "authz_http": "127.0.0.1:9192"})
    (cluster,) = [c for c in bootstrap["staticResources"]["clusters"] if c["name"] == "agent_authz_http"]
    address = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert address["socketAddress"] == {"address": "127.0.0.1", "portValue": 9192}


ANSWER_ONLY = [
    "content-length",
    *wire.HTTP_METADATA_KEYS,
    ":status",
    "x-envoy-upstream-service-time",
    wire.HEADERS_TO_REMOVE_HEADER,
    wire.REMAINING_HEADER,  # the client's response only, as with gRPC's response_headers_to_add
]
TO_SET = [
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "c",
    "d",
    "x",
    "content-lengthy",
    "content-lengt",
    "decisions",
    "decision-id",
    "reasons",
    "task",
    "mcp_list_filters",
    "x-envoy",
    "x-envo",
    wire.DECISION_ID_HEADER,
    wire.LIST_FILTER_HEADER,
    "accept-encoding",
    "x-enovy-key",
]


@pytest.mark.parametrize("name", ANSWER_ONLY)
def test_the_answers_own_headers_never_reach_the_upstream(name: str) -> None:
    assert re2.fullmatch(upstream_header_regex(), name) is None


@pytest.mark.parametrize("name", TO_SET)
def test_any_other_header_of_an_allow_is_set_on_the_request(name: str) -> None:
    assert re2.fullmatch(upstream_header_regex(), name) is not None


@pytest.mark.parametrize(
    ("name", "withheld"),
    [
        (wire.CALLER_HEADER, True),
        (wire.CONTEXT_HEADER, True),
        (wire.PEER_CERTIFICATE_HEADER, True),
        ("x-agent-authz-connectx", True),
        ("x-agent-authz-connec", True),
        ("x-agent-authz-", True),
        (wire.CONNECT_AUTHORITY_HEADER, False),  # Envoy's own, set before ext_authz on intercepting chains
        ("x-agent-task", False),
        ("authorization", False),
    ],
)
def test_the_check_never_carries_a_reserved_header_of_the_client(name: str, withheld: bool) -> None:
    assert (re2.fullmatch(reserved_header_regex(), name) is not None) is withheld


def test_a_connect_is_checked_over_grpc_whatever_the_transport(tmp_path: Path) -> None:
    """Envoy's HTTP service sends a CONNECT's check as ``CONNECT host:port`` (no prefix, no path): the
    CONNECT route of every egress virtual host overrides the service with the gRPC one."""
    bootstrap = _bootstrap(tmp_path, envoy={"egress_port": 15080})
    (egress,) = [m for m in _managers(bootstrap) if m["statPrefix"] == "egress_http"]
    for vhost in egress["routeConfig"]["virtualHosts"]:
        connect, *others = vhost["routes"]
        assert "connectMatcher" in connect["match"], vhost["name"]
        settings = connect["typedPerFilterConfig"][wire.HTTP_FILTER]["checkSettings"]
        assert settings["grpcService"]["envoyGrpc"]["clusterName"] == "agent_authz"
        assert settings["contextExtensions"] == {"direction": "egress"}
        for route in others:
            per_filter = route.get("typedPerFilterConfig", vhost.get("typedPerFilterConfig", {}))
            assert "grpcService" not in per_filter.get(wire.HTTP_FILTER, {}).get("checkSettings", {})


def test_only_undecided_requests_are_streamed_to_the_sidecar(tmp_path: Path) -> None:
    """Envoy's access-log MetadataFilter ignores a matcher's ``invert``: the refusal logger logs an entry
    whose ``decision_id`` is null or absent (``match_if_key_not_found``), never one that has a decision."""
    bootstrap = _bootstrap(tmp_path, envoy={"egress_port": 15080})
    loggers = [
        log
        for manager in _managers(bootstrap)
        for log in manager["accessLog"]
        if log["name"] == "envoy.access_loggers.http_grpc"
    ]
    assert loggers
    for log in loggers:
        assert log["filter"]["metadataFilter"] == {
            "matcher": {
                "filter": wire.HTTP_FILTER,
                "path": [{"key": wire.METADATA_DECISION_ID}],
                "value": {"nullMatch": {}},
            },
            "matchIfKeyNotFound": True,
        }
