"""The ``egress_http`` listener (the agent's explicit proxy) and the egress routes it shares with ``outbound``.

``egress_http`` (always): the HTTP connection manager of :mod:`sidecar.bootstrap.filters`; ext_authz
then the dynamic forward proxy then the router; ``context_extensions: {direction: egress}``. Routes,
in order:

* in every virtual host, first, the ``CONNECT`` route (:func:`connect_route`): a ``CONNECT host:port``
  is itself a decision with a record (ext_authz asks about it like any request; the sidecar allows it
  only where a rule gives ``host:port`` ``tls: intercept``); an allowed tunnel goes to the
  ``intercept_connect`` internal listener (:mod:`sidecar.bootstrap.intercept`), carrying the
  authority in filter state (:data:`~sidecar.wire.CONNECT_FILTER_STATE`) for the records of the
  requests inside; without ``intercept`` nothing is ever allowed and the route names the
  ``blackhole`` cluster;
* a virtual host per ``tls: originate`` host (``host`` and ``host:*``) routing to a cluster that opens
  TLS to ``host:upstream_port`` (:func:`~sidecar.bootstrap.clusters.tls_cluster`); its
  ``context_extensions`` carry ``upstream_tls: originate``;
* a virtual host and cluster per ``envoy.destinations`` entry;
* a virtual host per MCP/A2A host (:func:`rpc_vhost`) in place of the above, or through the dynamic
  forward proxy for a host that has neither: the body buffered for the sidecar, MCP ``tools/list``
  responses filtered;
* for the hosts of ``approval`` rules (:attr:`~sidecar.bootstrap.kit.Kit.body_hosts`) the body
  buffered too (context extension ``body_cap``), so an approval binds its digest;
* every other host through the dynamic forward proxy.

``CONNECT`` is accepted on ``egress_http`` and ``outbound`` (``upgrade_configs``), and HTTP/1.0 on
``egress_http`` because Python's ``http.client`` tunnels with ``CONNECT host:443 HTTP/1.0``.
"""

from __future__ import annotations

from typing import Any

from sidecar.bootstrap.clusters import dfp_cluster, dns_cache, host_port_cluster, tls_cluster
from sidecar.bootstrap.filters import (
    connect_route_context,
    connection_manager,
    route_metadata,
    rpc_route_context,
    rpc_route_metadata,
    vhost,
)
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import BLACKHOLE_CLUSTER, DFP_CLUSTER, EGRESS, INTERCEPT_CONNECT, destination_cluster_name
from sidecar.wire import CONNECT_FILTER_STATE, CONTEXT_UPSTREAM_TLS, LIST_FILTER_HEADER, ORIGINATE

__all__ = ["EgressRoutes", "connect_route", "connect_upgrade", "egress_listener", "egress_routes", "rpc_vhost"]

EgressRoutes = tuple[list[Any], list[Any], list[Any]]
"""``(virtual hosts, their clusters, the HTTP filters before the router)``: the dynamic forward proxy
and the filter keeping a ``CONNECT``'s authority for the tunnel."""


def connect_route(kit: Kit) -> Any:
    """The ``CONNECT`` route every egress virtual host starts with: ext_authz decides it (the virtual
    host's context); an allowed tunnel ends in ``intercept_connect`` (``blackhole`` without ``intercept``)."""
    r = kit.route
    upgrade = r.RouteAction.UpgradeConfig
    return r.Route(
        match=r.RouteMatch(connect_matcher=r.RouteMatch.ConnectMatcher()),
        route=r.RouteAction(
            cluster=INTERCEPT_CONNECT if kit.xds is not None else BLACKHOLE_CLUSTER,
            upgrade_configs=[upgrade(upgrade_type="CONNECT", connect_config=upgrade.ConnectConfig())],
        ),
        typed_per_filter_config=connect_route_context(kit, EGRESS),  # over gRPC, whatever the transport
        metadata=route_metadata(kit, EGRESS),  # the context, as on every route that asks
    )


def connect_upgrade(kit: Kit) -> dict[str, Any]:
    """The HTTP connection manager options that accept ``CONNECT`` (routed by :func:`connect_route`)."""
    return {"upgrade_configs": [kit.hcm.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")]}


def _connect_state(kit: Kit) -> Any:
    """``set_filter_state``: a ``CONNECT``'s ``:authority`` as :data:`~sidecar.wire.CONNECT_FILTER_STATE`,
    shared with the tunnel's upstream connection (the internal listener); nothing for other requests."""
    from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2 as common
    from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2 as sfs

    value = common.FilterStateValue(
        object_key=CONNECT_FILTER_STATE,
        factory_key="envoy.string",
        format_string=kit.core.SubstitutionFormatString(
            text_format_source=kit.core.DataSource(inline_string="%REQ(:AUTHORITY)%")
        ),
        shared_with_upstream=common.FilterStateValue.ONCE,
        skip_if_empty=True,
    )
    return kit.hcm.HttpFilter(
        name="envoy.filters.http.set_filter_state", typed_config=kit.pack(sfs.Config(on_request_headers=[value]))
    )


def rpc_vhost(kit: Kit, host: str, cluster: str, **extra: str) -> Any:
    """The virtual host of an MCP/A2A host: its body buffered for the sidecar; for hosts in
    ``envoy.mcp_header_decisions``, requests carrying ``Mcp-Method`` first take a route that
    buffers nothing (judged on ``Mcp-Method`` / ``Mcp-Name``). Every route removes
    ``x-agent-authz-list-filter`` before the upstream."""
    r, protocol = kit.route, kit.rpc_hosts[host]

    def route(body: bool, **match: Any) -> Any:
        return r.Route(
            match=r.RouteMatch(prefix="/", **match),
            route=r.RouteAction(cluster=cluster),
            typed_per_filter_config=rpc_route_context(kit, protocol, body=body, **extra),
            metadata=rpc_route_metadata(kit, protocol, body=body, **extra),
            request_headers_to_remove=[LIST_FILTER_HEADER],
        )

    routes = []
    if protocol == "mcp" and host in kit.settings.envoy.mcp_header_decisions:
        routes.append(route(False, headers=[r.HeaderMatcher(name="mcp-method", present_match=True)]))
    routes.append(route(True))
    return r.VirtualHost(
        name=f"rpc|{destination_cluster_name(host)}",
        domains=[host, f"{host}:*"],
        routes=[connect_route(kit), *routes],
    )


def egress_routes(kit: Kit) -> EgressRoutes:
    """Virtual hosts, clusters and the DFP filter shared by ``egress_http`` and ``outbound``."""
    envoy = kit.settings.envoy
    originate = kit.settings.originate_hosts()
    clusters = []
    vhosts = []
    for host, port in sorted(originate.items()):
        name = "tls|" + destination_cluster_name(host)
        cluster = tls_cluster(kit, name, host, port)
        clusters.append(cluster)
        if host in kit.rpc_hosts:
            vhosts.append(rpc_vhost(kit, host, name, **{CONTEXT_UPSTREAM_TLS: ORIGINATE}))
            continue
        body = host in kit.body_hosts
        vhosts.append(
            vhost(kit, name, [host, f"{host}:*"], name, EGRESS, context={CONTEXT_UPSTREAM_TLS: ORIGINATE}, body=body)
        )
    for host, address in sorted(envoy.destinations.items()):
        if host in originate:
            continue
        name = destination_cluster_name(host)
        clusters.append(host_port_cluster(kit, name, address))
        if host in kit.rpc_hosts:
            vhosts.append(rpc_vhost(kit, host, name))
            continue
        vhosts.append(vhost(kit, name, [host, f"{host}:*"], name, EGRESS, body=host in kit.body_hosts))
    for host in sorted(set(kit.rpc_hosts) - set(originate) - set(envoy.destinations)):
        vhosts.append(rpc_vhost(kit, host, DFP_CLUSTER))
    for host in sorted(kit.body_hosts - set(originate) - set(envoy.destinations)):
        name = "body|" + destination_cluster_name(host)
        vhosts.append(vhost(kit, name, [host, f"{host}:*"], DFP_CLUSTER, EGRESS, body=True))
    vhosts.append(vhost(kit, "any_host", ["*"], DFP_CLUSTER, EGRESS))
    for virtual_host in vhosts:
        if not virtual_host.routes[0].match.HasField("connect_matcher"):
            virtual_host.routes.insert(0, connect_route(kit))
    clusters.append(dfp_cluster(kit))
    dfp = kit.hcm.HttpFilter(
        name="envoy.filters.http.dynamic_forward_proxy",
        typed_config=kit.pack(kit.dfp_filter.FilterConfig(dns_cache_config=dns_cache(kit))),
    )
    return vhosts, clusters, [_connect_state(kit), dfp]


def egress_listener(kit: Kit, routes: EgressRoutes) -> tuple[Any, list[Any]]:
    """``egress_http`` and the clusters its routes name."""
    vhosts, clusters, filters = routes
    envoy = kit.settings.envoy
    # Python's http.client (urllib, and so many agents) tunnels with "CONNECT host:443 HTTP/1.0"
    options = {**connect_upgrade(kit), "http_protocol_options": kit.core.Http1ProtocolOptions(accept_http_10=True)}
    listener = kit.listener.Listener(
        name="egress_http",
        address=kit.address(envoy.egress_address, envoy.egress_port),
        filter_chains=[
            kit.listener.FilterChain(filters=[connection_manager(kit, "egress_http", vhosts, filters, **options)])
        ],
    )
    return listener, clusters
