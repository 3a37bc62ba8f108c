"""Render the Envoy bootstrap from ``sidecar.yaml``.

The bootstrap is built from envoy-data-plane's typed message classes (betterproto2 + pydantic), so a
wrong field name or type fails here, at render time, and ``envoy --mode validate`` checks the rest.
These classes are slow to import (~1 s) and are never loaded by ``agent-authz serve``.

What is rendered (``egress_http`` listener):

* HTTP connection manager with ``normalize_path``, ``merge_slashes`` and
  ``path_with_escaped_slashes_action: REJECT_REQUEST``, so the upstream receives exactly the
  canonical path the sidecar authorized (see :mod:`sidecar.http_norm`);
* the ext_authz filter (gRPC, ``failure_mode_allow: false``, short timeout,
  ``validate_mutations``), then the dynamic forward proxy filter, then the router;
* ``context_extensions: {direction: egress}`` on every virtual host;
* one virtual host and cluster per ``envoy.destinations`` entry (like an Istio ServiceEntry);
  other hosts go through the dynamic forward proxy (DNS);
* an access log on stdout with the decision id from ext_authz dynamic metadata.

Works both as a forward proxy (``HTTP_PROXY`` pointing at the listener; Envoy accepts absolute-form
request targets) and for requests addressed to the listener directly.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import timedelta
from typing import Any

from sidecar.config.loader import LoadedConfig

__all__ = ["AUTHZ_CLUSTER", "render_bootstrap", "render_bootstrap_json"]

AUTHZ_CLUSTER = "agent_authz"
DFP_CLUSTER = "dynamic_forward_proxy"
_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "decision_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%",
    "reason": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:reason)%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream": "%UPSTREAM_HOST%",
    "duration_ms": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def _cluster_name(host: str) -> str:
    return "dest|" + re.sub(r"[^a-z0-9._-]", "_", host)


def _socket_address(address: str, port: int) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress

    return Address(socket_address=SocketAddress(address=address, port_value=port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def render_bootstrap(loaded: LoadedConfig) -> Any:
    """Build the ``envoy.config.bootstrap.v3.Bootstrap`` message for ``loaded``.

    Returns:
        An envoy-data-plane ``Bootstrap`` instance.
    """
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.cluster.v3 import (
        Cluster,
        ClusterCustomClusterType,
        ClusterDiscoveryType,
        ClusterLbPolicy,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        ApiVersion,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        Http2ProtocolOptions,
        Node,
        Pipe,
        SubstitutionFormatString,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
    from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
    from envoy_data_plane.envoy.extensions.clusters.dynamic_forward_proxy.v3 import ClusterConfig
    from envoy_data_plane.envoy.extensions.filters.http.dynamic_forward_proxy.v3 import FilterConfig as DfpFilter
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import CheckSettings, ExtAuthz, ExtAuthzPerRoute
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Any as PbAny
    from envoy_data_plane.google.protobuf import Struct

    settings = loaded.settings
    envoy = settings.envoy
    timeout = timedelta(seconds=envoy.authz_timeout)

    # -- ext_authz gRPC cluster ---------------------------------------------------------------
    authz = settings.listen.authz
    if authz.startswith("unix:"):
        authz_address = Address(pipe=Pipe(path=authz[5:]))
    else:
        host, _, port = authz.rpartition(":")
        authz_address = _socket_address(host.strip("[]"), int(port))
    h2 = PbAny.pack(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
    )
    clusters = [
        Cluster(
            name=AUTHZ_CLUSTER,
            type=ClusterDiscoveryType.STATIC,
            connect_timeout=timedelta(seconds=1),
            typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
            load_assignment=ClusterLoadAssignment(
                cluster_name=AUTHZ_CLUSTER,
                endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=authz_address))])],
            ),
        )
    ]

    # -- destinations: one cluster and virtual host per declared host --------------------------
    egress_ctx = {
        "envoy.filters.http.ext_authz": PbAny.pack(
            ExtAuthzPerRoute(check_settings=CheckSettings(context_extensions={"direction": "egress"}))
        )
    }
    virtual_hosts = []
    for host, address in sorted(envoy.destinations.items()):
        name = _cluster_name(host)
        addr, _, port = address.rpartition(":")
        clusters.append(
            Cluster(
                name=name,
                type=ClusterDiscoveryType.STATIC if _is_ip(addr) else ClusterDiscoveryType.STRICT_DNS,
                connect_timeout=timedelta(seconds=2),
                load_assignment=ClusterLoadAssignment(
                    cluster_name=name,
                    endpoints=[
                        LocalityLbEndpoints(
                            lb_endpoints=[
                                LbEndpoint(endpoint=Endpoint(address=_socket_address(addr.strip("[]"), int(port))))
                            ]
                        )
                    ],
                ),
            )
        )
        virtual_hosts.append(
            VirtualHost(
                name=name,
                domains=[host, f"{host}:*"],
                routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=name))],
                typed_per_filter_config=egress_ctx,
            )
        )
    virtual_hosts.append(
        VirtualHost(
            name="any_host",
            domains=["*"],
            routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=DFP_CLUSTER))],
            typed_per_filter_config=egress_ctx,
        )
    )

    clusters.append(
        Cluster(
            name=DFP_CLUSTER,
            connect_timeout=timedelta(seconds=2),
            lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
            cluster_type=ClusterCustomClusterType(
                name="envoy.clusters.dynamic_forward_proxy",
                typed_config=PbAny.pack(ClusterConfig(dns_cache_config=_dns_cache())),
            ),
        )
    )

    # -- the egress listener ---------------------------------------------------------------------
    ext_authz = ExtAuthz(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER), timeout=timeout),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        validate_mutations=True,
        include_peer_certificate=True,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )
    hcm = HttpConnectionManager(
        stat_prefix="egress_http",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        route_config=RouteConfiguration(name="egress", virtual_hosts=virtual_hosts),
        http_filters=[
            HttpFilter(name="envoy.filters.http.ext_authz", typed_config=PbAny.pack(ext_authz)),
            HttpFilter(
                name="envoy.filters.http.dynamic_forward_proxy",
                typed_config=PbAny.pack(DfpFilter(dns_cache_config=_dns_cache())),
            ),
            HttpFilter(name="envoy.filters.http.router", typed_config=PbAny.pack(Router())),
        ],
        access_log=[
            AccessLog(
                name="envoy.access_loggers.stdout",
                typed_config=PbAny.pack(
                    StdoutAccessLog(
                        log_format=SubstitutionFormatString(json_format=Struct.from_dict(_ACCESS_LOG_FORMAT))
                    )
                ),
            )
        ],
    )
    listener = Listener(
        name="egress_http",
        address=_socket_address(envoy.egress_address, envoy.egress_port),
        filter_chains=[
            FilterChain(
                filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(hcm))]
            )
        ],
    )
    return Bootstrap(
        node=Node(id="agent-authz", cluster="agent-authz"),
        admin=Admin(address=_socket_address("127.0.0.1", envoy.admin_port)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


def _dns_cache() -> Any:
    from envoy_data_plane.envoy.config.cluster.v3 import ClusterDnsLookupFamily
    from envoy_data_plane.envoy.extensions.common.dynamic_forward_proxy.v3 import DnsCacheConfig

    return DnsCacheConfig(name="egress_dns", dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED)


def render_bootstrap_json(loaded: LoadedConfig) -> str:
    """The bootstrap as pretty-printed proto3 JSON (Envoy reads JSON as YAML)."""
    return json.dumps(render_bootstrap(loaded).to_dict(), indent=2) + "\n"
