"""The ``egress_http`` listener (the agent's explicit proxy) and the egress routes it shares with ``outbound``.

``egress_http`` (always): the HTTP connection manager of :mod:`sidecar.bootstrap.filters`; ext_authz
then the dynamic forward proxy then the router; ``context_extensions: {direction: egress}``. Routes,
in order:

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

With ``intercept`` it also accepts ``CONNECT host:443`` (``HTTPS_PROXY``) and hands the tunnel to the
``intercept_connect`` internal listener (:mod:`sidecar.bootstrap.intercept`); HTTP/1.0 is accepted
because Python's ``http.client`` tunnels with ``CONNECT host:443 HTTP/1.0``.
"""

from __future__ import annotations

from typing import Any

from sidecar.bootstrap.clusters import dfp_cluster, dns_cache, host_port_cluster, tls_cluster
from sidecar.bootstrap.filters import connection_manager, no_authz, rpc_route_context, rpc_route_metadata, vhost
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import DFP_CLUSTER, EGRESS, INTERCEPT_CONNECT, destination_cluster_name
from sidecar.wire import CONTEXT_UPSTREAM_TLS, LIST_FILTER_HEADER, ORIGINATE

__all__ = ["EgressRoutes", "egress_listener", "egress_routes", "rpc_vhost"]

EgressRoutes = tuple[list[Any], list[Any], Any]
"""``(virtual hosts, their clusters, the dynamic forward proxy filter)``."""


def rpc_vhost(kit: Kit, host: str, cluster: str, **extra: str) -> Any:
    """The virtual host of an MCP/A2A host: its body buffered for the sidecar; for hosts in
    ``envoy.mcp_header_decisions``, requests carrying ``Mcp-Method`` first take a route that
    buffers nothing (judged on ``Mcp-Method`` / ``Mcp-Name``). Every route removes
    ``x-agent-authz-list-filter`` before the upstream."""
    r, protocol = kit.route, kit.rpc_hosts[host]
    routes = []
    if protocol == "mcp" and host in kit.settings.envoy.mcp_header_decisions:
        routes.append(
            r.Route(
                match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="mcp-method", present_match=True)]),
                route=r.RouteAction(cluster=cluster),
                typed_per_filter_config=rpc_route_context(kit, protocol, body=False, **extra),
            )
        )
    routes.append(
        r.Route(
            match=r.RouteMatch(prefix="/"),
            route=r.RouteAction(cluster=cluster),
            typed_per_filter_config=rpc_route_context(kit, protocol, body=True, **extra),
        )
    )
    for route, body in zip(routes, [False] * (len(routes) - 1) + [True], strict=True):
        route.request_headers_to_remove = [LIST_FILTER_HEADER]
        metadata = rpc_route_metadata(kit, protocol, body=body, **extra)
        if metadata is not None:
            route.metadata = metadata
    return r.VirtualHost(name=f"rpc|{destination_cluster_name(host)}", domains=[host, f"{host}:*"], routes=routes)


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
    clusters.append(dfp_cluster(kit))
    dfp = kit.hcm.HttpFilter(
        name="envoy.filters.http.dynamic_forward_proxy",
        typed_config=kit.pack(kit.dfp_filter.FilterConfig(dns_cache_config=dns_cache(kit))),
    )
    return vhosts, clusters, dfp


def egress_listener(kit: Kit, routes: EgressRoutes) -> tuple[Any, list[Any]]:
    """``egress_http`` and the clusters its routes name."""
    vhosts, clusters, dfp = routes
    envoy, r, hcm = kit.settings.envoy, kit.route, kit.hcm
    extra: dict[str, Any] = {}
    if kit.xds is not None:  # HTTPS_PROXY: CONNECT host:443 ends in the intercepting internal listener
        connect = r.VirtualHost(
            name="connect_intercept",
            domains=["*:443"],
            routes=[
                r.Route(
                    match=r.RouteMatch(connect_matcher=r.RouteMatchConnectMatcher()),
                    route=r.RouteAction(
                        cluster=INTERCEPT_CONNECT,
                        upgrade_configs=[
                            r.RouteActionUpgradeConfig(
                                upgrade_type="CONNECT", connect_config=r.RouteActionUpgradeConfigConnectConfig()
                            )
                        ],
                    ),
                    typed_per_filter_config=no_authz(kit),
                )
            ],
        )
        vhosts = [connect, *vhosts]
        extra["upgrade_configs"] = [hcm.HttpConnectionManagerUpgradeConfig(upgrade_type="CONNECT")]
        # Python's http.client (urllib, and so many agents) tunnels with "CONNECT host:443 HTTP/1.0"
        extra["http_protocol_options"] = kit.core.Http1ProtocolOptions(accept_http_10=True)
    listener = kit.listener.Listener(
        name="egress_http",
        address=kit.address(envoy.egress_address, envoy.egress_port),
        filter_chains=[
            kit.listener.FilterChain(filters=[connection_manager(kit, "egress_http", vhosts, [dfp], **extra)])
        ],
    )
    return listener, clusters
