"""The Envoy routes of agent-protocol rules: only MCP/A2A routes buffer the body (and MCP routes run
the ext_proc filter for ``tools/list``); a header-decision route first where configured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidecar.bootstrap.render import render_envoy
from sidecar.config.loader import load_config
from tests.support.config import base_config, task, write_config, write_keys

MCP_RULE = {"host": "mcp.internal", "protocol": "mcp", "paths": ["/mcp"], "tools": ["query"]}
PLAIN_RULE = {"host": "api.internal", "methods": ["GET"], "paths": ["/v1/*"]}


def _bootstrap(tmp_path: Path, rules: list[dict[str, Any]], **envoy: Any) -> dict[str, Any]:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=rules)], {"mcp.internal": "127.0.0.1:1", "api.internal": "127.0.0.1:2"})
    config["envoy"].update(envoy)
    return render_envoy(load_config(write_config(tmp_path, config))).bootstrap


def _egress(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = next(x for x in bootstrap["staticResources"]["listeners"] if x["name"] == "egress_http")
    return listener["filterChains"][0]["filters"][0]["typedConfig"]


def test_only_mcp_routes_buffer_and_run_ext_proc(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [MCP_RULE, PLAIN_RULE], rpc_body_cap="2KiB"))
    filters = {f["name"]: f for f in manager["httpFilters"]}
    authz = filters["envoy.filters.http.ext_authz"]["typedConfig"]
    assert authz["withRequestBody"] == {"maxRequestBytes": 2049, "allowPartialMessage": True, "packAsBytes": True}
    ext_proc = filters["envoy.filters.http.ext_proc"]
    assert ext_proc["disabled"] is True
    assert ext_proc["typedConfig"]["extensionConfig"]["typedConfig"]["processingMode"]["responseBodyMode"] == "BUFFERED"
    vhosts = {v["name"]: v for v in manager["routeConfig"]["virtualHosts"]}
    mcp_route = vhosts["rpc|dest|mcp.internal"]["routes"][-1]
    check = mcp_route["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
    assert check["contextExtensions"] == {"direction": "egress", "rpc_protocol": "mcp", "rpc_body_cap": "2048"}
    assert check["withRequestBody"]["maxRequestBytes"] == 2049
    assert "envoy.filters.http.ext_proc" in mcp_route["typedPerFilterConfig"]
    assert mcp_route["requestHeadersToRemove"] == ["x-agent-authz-list-filter"]
    for name, vhost in vhosts.items():
        if name.startswith("rpc|") or "routes" not in vhost:
            continue
        per_filter = vhost.get("typedPerFilterConfig", {}).get("envoy.filters.http.ext_authz")
        if per_filter is not None and "checkSettings" in per_filter:
            assert per_filter["checkSettings"]["disableRequestBodyBuffering"] is True, name


def test_header_decision_route_first(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [MCP_RULE], mcp_header_decisions=["mcp.internal"]))
    connect, *routes = next(v for v in manager["routeConfig"]["virtualHosts"] if v["name"] == "rpc|dest|mcp.internal")[
        "routes"
    ]
    assert connect["match"] == {"connectMatcher": {}}  # every virtual host decides CONNECT first
    assert routes[0]["match"]["headers"] == [{"name": "mcp-method", "presentMatch": True}]
    first = routes[0]["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
    assert first["disableRequestBodyBuffering"] is True and "rpc_body_cap" not in first["contextExtensions"]


def test_without_agent_protocol_rules_nothing_changes(tmp_path: Path) -> None:
    manager = _egress(_bootstrap(tmp_path, [PLAIN_RULE]))
    names = [f["name"] for f in manager["httpFilters"]]
    assert "envoy.filters.http.ext_proc" not in names
    authz = next(f for f in manager["httpFilters"] if f["name"] == "envoy.filters.http.ext_authz")["typedConfig"]
    assert "withRequestBody" not in authz
    assert "x-agent-authz" not in json.dumps(manager["routeConfig"]).replace("x-agent-authz-", "")


def test_approval_hosts_buffer_the_body_for_the_binding(tmp_path: Path) -> None:
    """A plain-HTTP host of an ``approval`` rule (and one named in ``envoy.approval_hosts`` for
    grants) buffers the body, so an approval binds its digest; other plain hosts buffer none."""
    gated = {"host": "api.internal", "methods": ["POST"], "paths": ["/v1/*"], "approval": "required"}
    manager = _egress(_bootstrap(tmp_path, [gated], approval_hosts=["granted.internal"], rpc_body_cap="4KiB"))
    authz = {f["name"]: f for f in manager["httpFilters"]}["envoy.filters.http.ext_authz"]["typedConfig"]
    assert authz["withRequestBody"]["packAsBytes"] is True
    vhosts = {v["name"]: v for v in manager["routeConfig"]["virtualHosts"]}
    for name in ("dest|api.internal", "body|dest|granted.internal"):
        check = vhosts[name]["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
        assert check["contextExtensions"] == {"direction": "egress", "body_cap": "4096"}, name
        assert check["withRequestBody"]["maxRequestBytes"] == 4097, name
    assert vhosts["body|dest|granted.internal"]["domains"] == ["granted.internal", "granted.internal:*"]
    other = vhosts["any_host"]["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]
    assert other["disableRequestBodyBuffering"] is True and "body_cap" not in other["contextExtensions"]
