"""Render the Envoy bootstrap (and, for file identities, its SDS files) from ``sidecar.yaml``.

The configuration is built from envoy-data-plane's typed message classes (betterproto2 + pydantic),
so a wrong field name or type fails here, at render time, and ``envoy --mode validate`` checks the
rest. These classes are slow to import (~1 s) and are never loaded by ``agent-authz serve``.

Listeners:

* ``egress_http`` (always): HTTP connection manager with ``normalize_path``, ``merge_slashes`` and
  ``path_with_escaped_slashes_action: REJECT_REQUEST`` so the upstream receives exactly the canonical
  path the sidecar authorized; ext_authz (gRPC, ``failure_mode_allow: false``, short timeout,
  ``validate_mutations``) then the dynamic forward proxy then the router; ``context_extensions:
  {direction: egress}``; one virtual host and cluster per ``envoy.destinations`` entry; an access
  log on stdout carrying the decision id from ext_authz dynamic metadata.
* ``ingress_https`` (with an ``identity`` source and ``envoy.local_app``): terminates mTLS and
  requires a client certificate; Envoy's certificate and validation context come through SDS - from
  the SPIRE agent's SDS (``identity.source: workload_api``; secrets ``default`` and ``ALL``) or from
  file-based SDS (``identity.source: files``; Envoy watches the files, so rotation needs no restart);
  the validation context is Envoy's SPIFFE validator with one bundle per trust domain. The client's
  leaf certificate goes to ext_authz (``include_peer_certificate``) and its chain in
  ``x-forwarded-client-cert`` (``SANITIZE_SET``, so clients cannot forge it), with
  ``context_extensions: {direction: ingress}``.
* ``outbound`` (with ``envoy.outbound_port``): the listener the iptables rules of
  ``agent-authz iptables`` redirect the agent's TCP to (``original_dst``, ``tls_inspector`` and
  ``http_inspector`` listener filters). Plain HTTP gets the egress HTTP connection manager above -
  judged on the Host the agent named and routed by that name, never to the original destination
  IP. TLS the agent starts itself goes through the network ext_authz filter (SNI and original
  destination; gRPC metadata ``x-agent-authz-protocol: tls``) and then ``tcp_proxy`` to the
  original destination, connecting upstream only once allowed (``ON_DOWNSTREAM_DATA``). Anything
  else is asked about as ``tcp`` (always denied) and has only a cluster without endpoints behind it.
* ``tls: originate`` hosts: a virtual host per host (in ``egress_http`` and ``outbound``) routing to
  a cluster that opens TLS to ``host:upstream_port`` with SNI ``host``, verifying the certificate
  against ``envoy.upstream_ca`` (default: the system bundle) and the DNS name ``host``; its
  ``context_extensions`` carry ``upstream_tls: originate``.
* ``envoy.inbound_redirect``: the inbound listener gets ``original_dst``; a redirected connection is
  forwarded to ``127.0.0.1:<original port>`` (the agent's app), a direct one to ``local_app``.
* ``intercept`` (``tls: intercept`` rules): the filter chains that terminate the agent's TLS change
  with the active tasks, which a static bootstrap cannot do. So the ``outbound`` listener and the
  internal listener ``intercept_connect`` come from file-based LDS, and the verifying upstream
  clusters from file-based CDS, in ``intercept.state_dir`` - written by the sidecar
  (:mod:`sidecar.intercept.manager`) with :func:`render_dynamic`, the same code as the rest. Per
  intercepted ``host:port``: a filter chain matching the SNI (and, on ``outbound``, the original
  destination port) that terminates TLS with the host's pod-CA leaf (gRPC SDS from the sidecar,
  over the ``agent_authz`` cluster: the key never touches a disk; ALPN ``h2``, ``http/1.1``), then
  the egress HTTP connection manager with ext_authz (``context_extensions`` ``intercept:
  host:port``, ``upstream_verify``) and a route to a cluster that opens a new TLS
  connection to the host (``envoy.destinations`` address, else DNS) with SNI = the host, verifying
  the chain against ``envoy.upstream_ca`` (default: the system bundle) and the ``dNSName`` SAN;
  an upstream that fails is a 502 (``local_reply_config`` on ``UF``) and Envoy's access log carries
  ``upstream_tls_failure``. A request naming another host or port than the SNI gets 421. The
  ``egress_http`` listener accepts ``CONNECT host:443`` (``HTTPS_PROXY``) and hands the tunnel to
  ``intercept_connect``, whose chains are the same (port 443 only); a connection there that no
  chain takes is asked about (``x-agent-authz-via: connect``) and closed.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SYSTEM_CA_BUNDLE
from sidecar.decision import LIST_FILTER_HEADER
from sidecar.errors import ConfigError
from sidecar.intercept.files import XdsPaths
from sidecar.intercept.targets import InterceptTarget

__all__ = [
    "AUTHZ_CLUSTER",
    "BUNDLE_SECRET",
    "INTERCEPT_CONNECT",
    "SVID_SECRET",
    "DynamicResources",
    "RenderedEnvoy",
    "intercept_cluster_name",
    "intercept_secret_name",
    "prune_render_cache",
    "render_bootstrap_json",
    "render_dynamic",
    "render_envoy",
    "write_envoy",
]

AUTHZ_CLUSTER = "agent_authz"
DFP_CLUSTER = "dynamic_forward_proxy"
LOCAL_APP_CLUSTER = "local_app"
ORIGINAL_DST_CLUSTER = "outbound_original_dst"
BLACKHOLE_CLUSTER = "blackhole"
INBOUND_DST_CLUSTER = "inbound_original_dst"
INBOUND_DST_HEADER = "x-agent-authz-inbound-dst"
INTERCEPT_CONNECT = "intercept_connect"
"""The internal listener (and the cluster reaching it) that ``CONNECT host:443`` tunnels end in."""
_EARLY_DATA_BYTES = 64 * 1024
_TCP_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "listener": "outbound",
    "decision_id": "%DYNAMIC_METADATA(envoy.filters.network.ext_authz:decision_id)%",
    "reason": "%DYNAMIC_METADATA(envoy.filters.network.ext_authz:reason)%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "upstream": "%UPSTREAM_HOST%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
}
SPIRE_CLUSTER = "spire_agent"
SVID_SECRET = "spiffe_svid"  # noqa: S105 - an SDS resource name, not a secret
BUNDLE_SECRET = "spiffe_bundles"  # noqa: S105
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
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
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "upstream_tls_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}
_UPSTREAM_FAILURE_BODY = {
    "decision_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%",
    "reason": "upstream_failed",
    "detail": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}


@dataclass(frozen=True)
class RenderedEnvoy:
    """A bootstrap (proto3 JSON as a dict) and the extra files it references (path -> content)."""

    bootstrap: dict[str, Any]
    files: dict[Path, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DynamicResources:
    """What file-based LDS and CDS serve (proto3 JSON dicts, without ``@type``)."""

    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]


def _cluster_name(host: str) -> str:
    return "dest|" + re.sub(r"[^a-z0-9._-]", "_", host)


def intercept_cluster_name(target: InterceptTarget) -> str:
    """The CDS cluster re-originating TLS for ``target``: ``intercept|<host>|<upstream port>``."""
    return f"intercept|{target.host}|{target.upstream_port}"


def intercept_secret_name(host: str) -> str:
    """The SDS secret holding ``host``'s pod-CA leaf: ``intercept|<host>``."""
    return f"intercept|{host}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _Builder:
    """Holds the envoy-data-plane imports for one rendering (they are slow; import on demand)."""

    def __init__(self, loaded: LoadedConfig, sds_dir: Path | None) -> None:
        from envoy_data_plane.envoy.config import accesslog, cluster, core, endpoint, listener, route
        from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap
        from envoy_data_plane.envoy.extensions.access_loggers.stream import v3 as stream
        from envoy_data_plane.envoy.extensions.bootstrap.internal_listener import v3 as internal_listener
        from envoy_data_plane.envoy.extensions.clusters.dynamic_forward_proxy import v3 as dfp_cluster
        from envoy_data_plane.envoy.extensions.common.dynamic_forward_proxy import v3 as dfp_common
        from envoy_data_plane.envoy.extensions.filters.http.dynamic_forward_proxy import v3 as dfp_filter
        from envoy_data_plane.envoy.extensions.filters.http.ext_authz import v3 as ext_authz
        from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
        from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
        from envoy_data_plane.envoy.extensions.filters.listener.http_inspector import v3 as http_inspector
        from envoy_data_plane.envoy.extensions.filters.listener.original_dst import v3 as original_dst
        from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector import v3 as tls_inspector
        from envoy_data_plane.envoy.extensions.filters.network.ext_authz import v3 as net_ext_authz
        from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
        from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy import v3 as tcp_proxy
        from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls
        from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
        from envoy_data_plane.envoy.type import v3 as types
        from envoy_data_plane.envoy.type.matcher import v3 as matcher
        from envoy_data_plane.google import protobuf

        self.accesslog, self.cluster, self.core = accesslog.v3, cluster.v3, core.v3
        self.endpoint, self.listener, self.route = endpoint.v3, listener.v3, route.v3
        self.bootstrap, self.stream, self.tls, self.types, self.pb = bootstrap, stream, tls, types, protobuf
        self.dfp_cluster, self.dfp_common, self.dfp_filter = dfp_cluster, dfp_common, dfp_filter
        self.ext_authz, self.router, self.hcm, self.upstream_http = ext_authz, router, hcm, upstream_http
        self.http_inspector, self.original_dst, self.tls_inspector = http_inspector, original_dst, tls_inspector
        self.net_ext_authz, self.tcp_proxy, self.matcher = net_ext_authz, tcp_proxy, matcher
        self.internal_listener = internal_listener
        self.ext_proc = ext_proc
        self.loaded = loaded
        self.settings = loaded.settings
        self.rpc_hosts = loaded.settings.rpc_hosts()
        self.body_cap = int(loaded.settings.envoy.rpc_body_cap)
        self.sds_dir = sds_dir
        self.files: dict[Path, str] = {}
        intercept = self.settings.intercept
        self.xds = XdsPaths(loaded.resolve(intercept.state_dir).absolute()) if intercept is not None else None

    # -- small pieces ------------------------------------------------------------------------------
    def pack(self, message: Any) -> Any:
        return self.pb.Any.pack(message)

    def address(self, host: str, port: int) -> Any:
        return self.core.Address(socket_address=self.core.SocketAddress(address=host.strip("[]"), port_value=port))

    def static_cluster(self, name: str, address: Any, *, http2: bool = False, dns: bool = False) -> Any:
        c = self.cluster
        options = {}
        if http2:
            protocol = self.upstream_http.HttpProtocolOptions(
                explicit_http_config=self.upstream_http.HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=self.core.Http2ProtocolOptions()
                )
            )
            options = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": self.pack(protocol)}
        return c.Cluster(
            name=name,
            type=c.ClusterDiscoveryType.STRICT_DNS if dns else c.ClusterDiscoveryType.STATIC,
            connect_timeout=timedelta(seconds=2),
            typed_extension_protocol_options=options,
            load_assignment=self.endpoint.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[
                    self.endpoint.LocalityLbEndpoints(
                        lb_endpoints=[self.endpoint.LbEndpoint(endpoint=self.endpoint.Endpoint(address=address))]
                    )
                ],
            ),
        )

    def host_port_cluster(self, name: str, host_port: str) -> Any:
        host, _, port = host_port.rpartition(":")
        return self.static_cluster(name, self.address(host, int(port)), dns=not _is_ip(host))

    def context(self, direction: str, **extra: str) -> dict[str, Any]:
        ea = self.ext_authz
        extensions = {"direction": direction, **extra}
        settings = ea.CheckSettings(context_extensions=extensions)
        if self.rpc_hosts:  # the filter buffers bodies (for the MCP/A2A routes): not here
            settings.disable_request_body_buffering = True
        per_route = ea.ExtAuthzPerRoute(check_settings=settings)
        return {"envoy.filters.http.ext_authz": self.pack(per_route)}

    def body_buffer(self) -> Any:
        """``with_request_body`` of MCP/A2A routes: the raw bytes (``pack_as_bytes``), up to the cap
        plus one byte. ``allow_partial_message: true`` so that a longer body still reaches the
        sidecar (which sees it is over the cap and records ``mcp_body_too_large``): with ``false``,
        Envoy answers 413 itself, unrecorded, and sets the stream's buffer limit to the cap, which
        also fails any response longer than the cap (a large ``tools/list``) with a 500."""
        return self.ext_authz.BufferSettings(
            max_request_bytes=self.body_cap + 1, allow_partial_message=True, pack_as_bytes=True
        )

    def rpc_context(self, protocol: str, *, body: bool, **extra: str) -> dict[str, Any]:
        """Per-route config of an MCP/A2A route: the body buffered (or, for header decisions, not),
        and for MCP the ext_proc filter switched on (``tools/list`` filtering)."""
        ea = self.ext_authz
        extensions = {"direction": "egress", "rpc_protocol": protocol, **extra}
        if body:
            extensions["rpc_body_cap"] = str(self.body_cap)
        settings = ea.CheckSettings(context_extensions=extensions)
        if body:
            settings.with_request_body = self.body_buffer()
        else:
            settings.disable_request_body_buffering = True
        config = {"envoy.filters.http.ext_authz": self.pack(ea.ExtAuthzPerRoute(check_settings=settings))}
        if protocol == "mcp":
            enable = self.route.FilterConfig(
                config=self.pack(self.ext_proc.ExtProcPerRoute(overrides=self.ext_proc.ExtProcOverrides()))
            )
            config["envoy.filters.http.ext_proc"] = self.pack(enable)
        return config

    def ext_proc_filter(self) -> Any:
        """Envoy's ext_proc filter for ``tools/list`` responses, off unless a route switches it on:
        response headers sent, the body buffered, the ext_authz metadata forwarded. It runs only for
        a request that ext_authz marked with ``x-agent-authz-list-filter: 1`` (an allowed
        ``tools/list``; ``match_delegate`` skips it for every other request, so other responses
        cost no round trip; the route removes the header before the upstream)."""
        ep, core = self.ext_proc, self.core
        from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
        from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
        from envoy_data_plane.envoy.type.matcher.v3 import HttpRequestHeaderMatchInput
        from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsExtension
        from envoy_data_plane.xds.type.matcher import v3 as xm

        mode = ep.ProcessingMode(
            request_header_mode=ep.ProcessingModeHeaderSendMode.SKIP,
            response_header_mode=ep.ProcessingModeHeaderSendMode.SEND,
            request_body_mode=ep.ProcessingModeBodySendMode.NONE,
            response_body_mode=ep.ProcessingModeBodySendMode.BUFFERED,
            request_trailer_mode=ep.ProcessingModeHeaderSendMode.SKIP,
            response_trailer_mode=ep.ProcessingModeHeaderSendMode.SKIP,
        )
        config = ep.ExternalProcessor(
            grpc_service=core.GrpcService(
                envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
                timeout=timedelta(seconds=self.settings.envoy.authz_timeout),
            ),
            failure_mode_allow=False,
            processing_mode=mode,
            allow_mode_override=True,
            message_timeout=timedelta(seconds=self.settings.envoy.authz_timeout),
            metadata_options=ep.MetadataOptions(
                forwarding_namespaces=ep.MetadataOptionsMetadataNamespaces(untyped=["envoy.filters.http.ext_authz"])
            ),
        )
        marked = xm.MatcherMatcherListPredicateSinglePredicate(
            input=XdsExtension(
                name="list-filter", typed_config=self.pack(HttpRequestHeaderMatchInput(header_name=LIST_FILTER_HEADER))
            ),
            value_match=xm.StringMatcher(exact="1"),
        )
        skip_unmarked = xm.Matcher(
            matcher_list=xm.MatcherMatcherList(
                matchers=[
                    xm.MatcherMatcherListFieldMatcher(
                        predicate=xm.MatcherMatcherListPredicate(
                            not_matcher=xm.MatcherMatcherListPredicate(single_predicate=marked)
                        ),
                        on_match=xm.MatcherOnMatch(
                            action=XdsExtension(name="skip", typed_config=self.pack(SkipFilter()))
                        ),
                    )
                ]
            )
        )
        wrapped = ExtensionWithMatcher(
            extension_config=core.TypedExtensionConfig(
                name="envoy.filters.http.ext_proc", typed_config=self.pack(config)
            ),
            xds_matcher=skip_unmarked,
        )
        return self.hcm.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=self.pack(wrapped), disabled=True)

    def no_authz(self) -> dict[str, Any]:
        """Per-route config switching ext_authz off (the ``CONNECT`` tunnel: decisions happen inside)."""
        return {"envoy.filters.http.ext_authz": self.pack(self.ext_authz.ExtAuthzPerRoute(disabled=True))}

    def ext_authz_filter(self) -> Any:
        ea, core = self.ext_authz, self.core
        config = ea.ExtAuthz(
            grpc_service=core.GrpcService(
                envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
                timeout=timedelta(seconds=self.settings.envoy.authz_timeout),
            ),
            transport_api_version=core.ApiVersion.V3,
            failure_mode_allow=False,
            validate_mutations=True,
            include_peer_certificate=True,
            status_on_error=self.types.HttpStatus(code=self.types.StatusCode.ServiceUnavailable),
        )
        if self.rpc_hosts:  # pack_as_bytes is read from here only; each route says whether it buffers
            config.with_request_body = self.body_buffer()
        return self.hcm.HttpFilter(name="envoy.filters.http.ext_authz", typed_config=self.pack(config))

    def access_log(self) -> Any:
        log = self.stream.StdoutAccessLog(
            log_format=self.core.SubstitutionFormatString(json_format=self.pb.Struct.from_dict(_ACCESS_LOG_FORMAT))
        )
        return self.accesslog.AccessLog(name="envoy.access_loggers.stdout", typed_config=self.pack(log))

    def connection_manager(
        self,
        stat_prefix: str,
        vhosts: list[Any],
        filters: list[Any],
        *,
        validate_clusters: bool | None = None,
        **extra: Any,
    ) -> Any:
        """The egress/ingress HTTP connection manager. ``validate_clusters=False`` for routes to CDS
        clusters, which may arrive after the listener that names them (file-based xDS has no order)."""
        hcm = self.hcm
        route_config = self.route.RouteConfiguration(name=stat_prefix, virtual_hosts=vhosts)
        if validate_clusters is not None:
            route_config.validate_clusters = validate_clusters
        manager = hcm.HttpConnectionManager(
            stat_prefix=stat_prefix,
            codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
            normalize_path=True,
            merge_slashes=True,
            path_with_escaped_slashes_action=hcm.HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
            route_config=route_config,
            http_filters=[
                self.ext_authz_filter(),
                *([self.ext_proc_filter()] if "mcp" in self.rpc_hosts.values() else []),
                *filters,
                hcm.HttpFilter(name="envoy.filters.http.router", typed_config=self.pack(self.router.Router())),
            ],
            access_log=[self.access_log()],
            **extra,
        )
        return self.listener.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=self.pack(manager)
        )

    def vhost(self, name: str, domains: list[str], cluster: str, direction: str, **extra: Any) -> Any:
        r = self.route
        context = extra.pop("context", {})
        return r.VirtualHost(
            name=name,
            domains=domains,
            routes=[r.Route(match=r.RouteMatch(prefix="/"), route=r.RouteAction(cluster=cluster))],
            typed_per_filter_config=self.context(direction, **context),
            **extra,
        )

    def rpc_vhost(self, host: str, cluster: str, **extra: str) -> Any:
        """The virtual host of an MCP/A2A host: its body buffered for the sidecar; for hosts in
        ``envoy.mcp_header_decisions``, requests carrying ``Mcp-Method`` first take a route that
        buffers nothing (judged on ``Mcp-Method`` / ``Mcp-Name``)."""
        r, protocol = self.route, self.rpc_hosts[host]
        routes = []
        if protocol == "mcp" and host in self.settings.envoy.mcp_header_decisions:
            routes.append(
                r.Route(
                    match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="mcp-method", present_match=True)]),
                    route=r.RouteAction(cluster=cluster),
                    typed_per_filter_config=self.rpc_context(protocol, body=False, **extra),
                )
            )
        routes.append(
            r.Route(
                match=r.RouteMatch(prefix="/"),
                route=r.RouteAction(cluster=cluster),
                typed_per_filter_config=self.rpc_context(protocol, body=True, **extra),
            )
        )
        for route in routes:
            route.request_headers_to_remove = [LIST_FILTER_HEADER]
        return r.VirtualHost(name=f"rpc|{_cluster_name(host)}", domains=[host, f"{host}:*"], routes=routes)

    # -- egress -------------------------------------------------------------------------------------
    def dns_cache(self) -> Any:
        return self.dfp_common.DnsCacheConfig(
            name="egress_dns", dns_lookup_family=self.cluster.ClusterDnsLookupFamily.V4_PREFERRED
        )

    def upstream_ca(self) -> Path:
        """The bundle upstream certificates are verified against (``envoy.upstream_ca``, else the system's)."""
        envoy = self.settings.envoy
        return self.loaded.resolve(envoy.upstream_ca).absolute() if envoy.upstream_ca is not None else SYSTEM_CA_BUNDLE

    def tls_cluster(self, name: str, host: str, port: int, *, alpn: bool = False) -> Any:
        """A cluster opening TLS to ``host:port`` (or the ``envoy.destinations`` address of ``host``)
        with SNI ``host``, verifying the chain against :meth:`upstream_ca` and the ``dNSName`` SAN
        ``host``. With ``alpn``, HTTP/2 or HTTP/1.1 as the upstream's ALPN says (``auto_config``)."""
        envoy, tls = self.settings.envoy, self.tls
        address = envoy.destinations.get(host)
        target = address.rpartition(":")[0] if address is not None else host
        context = tls.UpstreamTlsContext(
            sni=host,
            common_tls_context=tls.CommonTlsContext(
                tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParametersTlsProtocol.TLSv1_2),
                validation_context=tls.CertificateValidationContext(
                    trusted_ca=self.core.DataSource(filename=str(self.upstream_ca())),
                    match_typed_subject_alt_names=[
                        tls.SubjectAltNameMatcher(
                            san_type=tls.SubjectAltNameMatcherSanType.DNS,
                            matcher=self.matcher.StringMatcher(exact=host),
                        )
                    ],
                ),
                alpn_protocols=["h2", "http/1.1"] if alpn else [],
            ),
        )
        cluster = self.static_cluster(name, self.address(target, port), dns=not _is_ip(target))
        cluster.transport_socket = self.core.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=self.pack(context)
        )
        if alpn:
            uh, core = self.upstream_http, self.core
            protocol = uh.HttpProtocolOptions(
                auto_config=uh.HttpProtocolOptionsAutoHttpConfig(
                    http_protocol_options=core.Http1ProtocolOptions(),
                    http2_protocol_options=core.Http2ProtocolOptions(),
                )
            )
            cluster.typed_extension_protocol_options = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": self.pack(protocol)
            }
        return cluster

    def originate_cluster(self, host: str, port: int) -> Any:
        """A cluster opening TLS to ``host:port`` (or the ``envoy.destinations`` address of ``host``)."""
        return self.tls_cluster("tls|" + _cluster_name(host), host, port)

    def egress_routes(self) -> tuple[list[Any], list[Any], Any]:
        """Virtual hosts, clusters and the DFP filter shared by ``egress_http`` and ``outbound``."""
        envoy = self.settings.envoy
        originate = self.settings.originate_hosts()
        clusters = []
        vhosts = []
        for host, port in sorted(originate.items()):
            cluster = self.originate_cluster(host, port)
            clusters.append(cluster)
            if host in self.rpc_hosts:
                vhosts.append(self.rpc_vhost(host, cluster.name, upstream_tls="originate"))
                continue
            vhosts.append(
                self.vhost(
                    cluster.name, [host, f"{host}:*"], cluster.name, "egress", context={"upstream_tls": "originate"}
                )
            )
        for host, address in sorted(envoy.destinations.items()):
            if host in originate:
                continue
            name = _cluster_name(host)
            clusters.append(self.host_port_cluster(name, address))
            if host in self.rpc_hosts:
                vhosts.append(self.rpc_vhost(host, name))
                continue
            vhosts.append(self.vhost(name, [host, f"{host}:*"], name, "egress"))
        for host in sorted(set(self.rpc_hosts) - set(originate) - set(envoy.destinations)):
            vhosts.append(self.rpc_vhost(host, DFP_CLUSTER))
        vhosts.append(self.vhost("any_host", ["*"], DFP_CLUSTER, "egress"))
        c = self.cluster
        clusters.append(
            c.Cluster(
                name=DFP_CLUSTER,
                connect_timeout=timedelta(seconds=2),
                lb_policy=c.ClusterLbPolicy.CLUSTER_PROVIDED,
                cluster_type=c.ClusterCustomClusterType(
                    name="envoy.clusters.dynamic_forward_proxy",
                    typed_config=self.pack(self.dfp_cluster.ClusterConfig(dns_cache_config=self.dns_cache())),
                ),
            )
        )
        dfp = self.hcm.HttpFilter(
            name="envoy.filters.http.dynamic_forward_proxy",
            typed_config=self.pack(self.dfp_filter.FilterConfig(dns_cache_config=self.dns_cache())),
        )
        return vhosts, clusters, dfp

    def egress(self, vhosts: list[Any], clusters: list[Any], dfp: Any) -> tuple[Any, list[Any]]:
        envoy, r, hcm = self.settings.envoy, self.route, self.hcm
        extra: dict[str, Any] = {}
        if self.xds is not None:  # HTTPS_PROXY: CONNECT host:443 ends in the intercepting internal listener
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
                        typed_per_filter_config=self.no_authz(),
                    )
                ],
            )
            vhosts = [connect, *vhosts]
            extra["upgrade_configs"] = [hcm.HttpConnectionManagerUpgradeConfig(upgrade_type="CONNECT")]
            # Python's http.client (urllib, and so many agents) tunnels with "CONNECT host:443 HTTP/1.0"
            extra["http_protocol_options"] = self.core.Http1ProtocolOptions(accept_http_10=True)
        listener = self.listener.Listener(
            name="egress_http",
            address=self.address(envoy.egress_address, envoy.egress_port),
            filter_chains=[
                self.listener.FilterChain(filters=[self.connection_manager("egress_http", vhosts, [dfp], **extra)])
            ],
        )
        return listener, clusters

    # -- intercept (tls: intercept) ---------------------------------------------------------------------
    def upstream_verify(self, host: str) -> str:
        """What the intercept cluster of ``host`` checks, as recorded in decisions."""
        return f"dns:{host} ca:{self.upstream_ca()}"

    def intercept_secret(self, host: str) -> Any:
        """The leaf of ``host`` from the sidecar's gRPC SDS (:mod:`sidecar.intercept.sds`), over ``agent_authz``."""
        core = self.core
        source = core.ConfigSource(
            api_config_source=core.ApiConfigSource(
                api_type=core.ApiConfigSourceApiType.GRPC,
                transport_api_version=core.ApiVersion.V3,
                grpc_services=[core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER))],
            ),
            resource_api_version=core.ApiVersion.V3,
        )
        return self.tls.SdsSecretConfig(name=intercept_secret_name(host), sds_config=source)

    def intercept_chain(self, target: InterceptTarget, *, match_port: bool) -> Any:
        """Terminate TLS for ``target.host`` with its pod-CA leaf, judge each request, re-originate TLS."""
        ls, r, tls, hcm = self.listener, self.route, self.tls, self.hcm
        host, port = target.host, target.port
        context = {"intercept": f"{host}:{port}", "upstream_verify": self.upstream_verify(host)}
        cluster = intercept_cluster_name(target)
        domains = [host, f"{host}:{port}"]
        allowed = self.vhost(cluster, domains, cluster, "egress", context=context)
        misdirected = r.VirtualHost(
            name="misdirected",
            domains=["*"],
            routes=[r.Route(match=r.RouteMatch(prefix="/"), direct_response=r.DirectResponseAction(status=421))],
            typed_per_filter_config=self.context("egress", **context),
        )
        failure = self.core.SubstitutionFormatString(json_format=self.pb.Struct.from_dict(_UPSTREAM_FAILURE_BODY))
        local_reply = hcm.LocalReplyConfig(
            mappers=[
                hcm.ResponseMapper(
                    filter=self.accesslog.AccessLogFilter(
                        response_flag_filter=self.accesslog.ResponseFlagFilter(flags=["UF"])
                    ),
                    status_code=502,
                    body_format_override=failure,
                )
            ]
        )
        manager = self.connection_manager(
            "outbound_intercept", [allowed, misdirected], [], local_reply_config=local_reply, validate_clusters=False
        )
        downstream = tls.DownstreamTlsContext(
            common_tls_context=tls.CommonTlsContext(
                tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParametersTlsProtocol.TLSv1_2),
                tls_certificate_sds_secret_configs=[self.intercept_secret(host)],
                alpn_protocols=["h2", "http/1.1"],
            )
        )
        match = ls.FilterChainMatch(server_names=[host], transport_protocol="tls")
        if match_port:
            match.destination_port = port
        return ls.FilterChain(
            name=f"intercept|{host}:{port}",
            filter_chain_match=match,
            filters=[manager],
            transport_socket=self.core.TransportSocket(
                name="envoy.transport_sockets.tls", typed_config=self.pack(downstream)
            ),
        )

    def intercept_connect_listener(self) -> Any:
        """The internal listener ``CONNECT host:443`` tunnels end in (the intercepting chains of port 443
        are added by :meth:`dynamic`)."""
        ls = self.listener
        return ls.Listener(
            name=INTERCEPT_CONNECT,
            internal_listener=ls.ListenerInternalListenerConfig(),
            listener_filters=[
                self.listener_filter("envoy.filters.listener.tls_inspector", self.tls_inspector.TlsInspector())
            ],
            default_filter_chain=ls.FilterChain(
                name="intercept_connect_other",
                filters=[
                    self.network_check("tls", via="connect"),
                    self.tcp_forward("intercept_connect", BLACKHOLE_CLUSTER),
                ],
            ),
        )

    def blackhole_cluster(self) -> Any:
        c = self.cluster
        return c.Cluster(
            name=BLACKHOLE_CLUSTER,
            type=c.ClusterDiscoveryType.STATIC,
            connect_timeout=timedelta(seconds=1),
            load_assignment=self.endpoint.ClusterLoadAssignment(cluster_name=BLACKHOLE_CLUSTER),
        )

    # -- outbound (transparent) -----------------------------------------------------------------------
    def listener_filter(self, name: str, config: Any) -> Any:
        return self.listener.ListenerFilter(name=name, typed_config=self.pack(config))

    def additional_addresses(self, host: str, port: int) -> list[Any]:
        if not self.settings.envoy.ipv6:
            return []
        return [self.listener.AdditionalAddress(address=self.address(host, port))]

    def network_check(self, protocol: str, *, via: str = "") -> Any:
        """Network ext_authz: one Check per connection, its context in gRPC metadata."""
        core = self.core
        metadata = [
            core.HeaderValue(key="x-agent-authz-direction", value="egress"),
            core.HeaderValue(key="x-agent-authz-protocol", value=protocol),
        ]
        if via:
            metadata.append(core.HeaderValue(key="x-agent-authz-via", value=via))
        config = self.net_ext_authz.ExtAuthz(
            stat_prefix=f"{via or 'outbound'}_{protocol}",
            grpc_service=core.GrpcService(
                envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
                timeout=timedelta(seconds=self.settings.envoy.authz_timeout),
                initial_metadata=metadata,
            ),
            transport_api_version=core.ApiVersion.V3,
            failure_mode_allow=False,
            include_tls_session=True,
            send_tls_alert_on_denial=protocol == "tls",
        )
        return self.listener.Filter(name="envoy.filters.network.ext_authz", typed_config=self.pack(config))

    def tcp_forward(self, stat_prefix: str, cluster: str) -> Any:
        """``tcp_proxy`` that connects upstream only after the first bytes passed ext_authz."""
        tp = self.tcp_proxy
        log = self.stream.StdoutAccessLog(
            log_format=self.core.SubstitutionFormatString(json_format=self.pb.Struct.from_dict(_TCP_ACCESS_LOG_FORMAT))
        )
        config = tp.TcpProxy(
            stat_prefix=stat_prefix,
            cluster=cluster,
            upstream_connect_mode=tp.UpstreamConnectMode.ON_DOWNSTREAM_DATA,
            max_early_data_bytes=_EARLY_DATA_BYTES,
            access_log=[self.accesslog.AccessLog(name="envoy.access_loggers.stdout", typed_config=self.pack(log))],
        )
        return self.listener.Filter(name="envoy.filters.network.tcp_proxy", typed_config=self.pack(config))

    def outbound(self, vhosts: list[Any], dfp: Any, ports: tuple[int, ...] = ()) -> tuple[Any, list[Any]]:
        """The transparent listener (without intercepting chains) and its clusters; ``ports`` are the
        ports that have intercepting chains (each gets its own copy of the generic chains)."""
        envoy, ls, c = self.settings.envoy, self.listener, self.cluster
        assert envoy.outbound_port is not None
        clusters = [
            c.Cluster(
                name=ORIGINAL_DST_CLUSTER,
                type=c.ClusterDiscoveryType.ORIGINAL_DST,
                lb_policy=c.ClusterLbPolicy.CLUSTER_PROVIDED,
                connect_timeout=timedelta(seconds=2),
            ),
            self.blackhole_cluster(),
        ]

        def generic(port: int | None = None) -> list[Any]:
            """Passthrough/refusal of other TLS, and plain HTTP: for any port, or for ``port``."""
            suffix = f"|{port}" if port is not None else ""
            tls, http = (
                ls.FilterChainMatch(transport_protocol="tls"),
                ls.FilterChainMatch(
                    transport_protocol="raw_buffer", application_protocols=["http/1.0", "http/1.1", "h2c"]
                ),
            )
            if port is not None:
                tls.destination_port = http.destination_port = port
            return [
                ls.FilterChain(
                    name="outbound_tls" + suffix,
                    filter_chain_match=tls,
                    filters=[self.network_check("tls"), self.tcp_forward("outbound_tls", ORIGINAL_DST_CLUSTER)],
                ),
                ls.FilterChain(
                    name="outbound_http" + suffix,
                    filter_chain_match=http,
                    filters=[self.connection_manager("outbound_http", vhosts, [dfp])],
                ),
            ]

        # Envoy matches the destination port first and never falls back to chains without one: every
        # port that has intercepting chains gets its own copy of the other chains.
        per_port = [chain for port in ports for chain in generic(port)]
        listener = ls.Listener(
            name="outbound",
            address=self.address(envoy.outbound_address, envoy.outbound_port),
            additional_addresses=self.additional_addresses("::1", envoy.outbound_port),
            listener_filters=[
                self.listener_filter("envoy.filters.listener.original_dst", self.original_dst.OriginalDst()),
                self.listener_filter("envoy.filters.listener.tls_inspector", self.tls_inspector.TlsInspector()),
                self.listener_filter("envoy.filters.listener.http_inspector", self.http_inspector.HttpInspector()),
            ],
            filter_chains=[*per_port, *generic()],
            default_filter_chain=ls.FilterChain(
                name="outbound_tcp",
                filters=[self.network_check("tcp"), self.tcp_forward("outbound_tcp", BLACKHOLE_CLUSTER)],
            ),
        )
        return listener, clusters

    # -- ingress ------------------------------------------------------------------------------------
    def sds(self, name: str, file_name: str) -> Any:
        core = self.core
        identity = self.settings.identity
        assert identity is not None
        if identity.source == "workload_api":
            source = core.ConfigSource(
                api_config_source=core.ApiConfigSource(
                    api_type=core.ApiConfigSourceApiType.GRPC,
                    transport_api_version=core.ApiVersion.V3,
                    grpc_services=[core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=SPIRE_CLUSTER))],
                ),
                resource_api_version=core.ApiVersion.V3,
            )
        else:
            assert self.sds_dir is not None
            source = core.ConfigSource(
                path_config_source=core.PathConfigSource(
                    path=str(self.sds_dir / file_name), watched_directory=core.WatchedDirectory(path=str(self.sds_dir))
                ),
                resource_api_version=core.ApiVersion.V3,
            )
        return self.tls.SdsSecretConfig(name=name, sds_config=source)

    def file_secrets(self) -> None:
        """Write the file-based SDS resources: the SVID and the SPIFFE validation context."""
        identity = self.settings.identity
        assert identity is not None and identity.files is not None and self.sds_dir is not None
        files, core, tls = identity.files, self.core, self.tls

        def source(path: Path) -> Any:
            resolved = self.loaded.resolve(path).absolute()
            return core.DataSource(
                filename=str(resolved), watched_directory=core.WatchedDirectory(path=str(resolved.parent))
            )

        svid_path = self.loaded.resolve(files.svid).absolute()
        svid = tls.Secret(
            name=SVID_SECRET,
            tls_certificate=tls.TlsCertificate(
                certificate_chain=core.DataSource(filename=str(svid_path)),
                private_key=core.DataSource(filename=str(self.loaded.resolve(files.key).absolute())),
                watched_directory=core.WatchedDirectory(path=str(svid_path.parent)),
            ),
        )
        validator = tls.SpiffeCertValidatorConfig(
            trust_domains=[
                tls.SpiffeCertValidatorConfigTrustDomain(name=td, trust_bundle=source(path))
                for td, path in sorted(files.bundles.items())
            ]
        )
        bundles = tls.Secret(
            name=BUNDLE_SECRET,
            validation_context=tls.CertificateValidationContext(
                custom_validator_config=core.TypedExtensionConfig(
                    name="envoy.tls.cert_validator.spiffe", typed_config=self.pack(validator)
                )
            ),
        )
        for secret, name in ((svid, "svid.json"), (bundles, "bundles.json")):
            resource = {"@type": _SECRET_TYPE, **secret.to_dict()}
            self.files[self.sds_dir / name] = json.dumps({"resources": [resource]}, indent=2) + "\n"

    def ingress(self) -> tuple[Any, list[Any]]:
        envoy, identity = self.settings.envoy, self.settings.identity
        assert identity is not None
        clusters = []
        if envoy.local_app is not None:
            clusters.append(self.host_port_cluster(LOCAL_APP_CLUSTER, envoy.local_app))
        if identity.source == "workload_api":
            svid_name, bundle_name = identity.workload_api.svid_secret, identity.workload_api.bundle_secret
            socket = identity.workload_api.socket.removeprefix("unix://")
            clusters.append(
                self.static_cluster(SPIRE_CLUSTER, self.core.Address(pipe=self.core.Pipe(path=socket)), http2=True)
            )
        else:
            svid_name, bundle_name = SVID_SECRET, BUNDLE_SECRET
            self.file_secrets()
        tls = self.tls
        context = tls.DownstreamTlsContext(
            require_client_certificate=True,
            common_tls_context=tls.CommonTlsContext(
                tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParametersTlsProtocol.TLSv1_2),
                tls_certificate_sds_secret_configs=[self.sds(svid_name, "svid.json")],
                validation_context_sds_secret_config=self.sds(bundle_name, "bundles.json"),
                alpn_protocols=["h2", "http/1.1"],
            ),
        )
        hcm, ls = self.hcm, self.listener

        def chain(vhost: Any, **match: Any) -> Any:
            manager = self.connection_manager(
                "ingress_http",
                [vhost],
                [],
                forward_client_cert_details=hcm.HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET,
                set_current_client_cert_details=hcm.HttpConnectionManagerSetCurrentClientCertDetails(
                    uri=True, chain=True
                ),
            )
            return ls.FilterChain(
                filter_chain_match=ls.FilterChainMatch(**match) if match else None,
                filters=[manager],
                transport_socket=self.core.TransportSocket(
                    name="envoy.transport_sockets.tls", typed_config=self.pack(context)
                ),
            )

        local = self.vhost("local_app", ["*"], LOCAL_APP_CLUSTER, "ingress")
        if not envoy.inbound_redirect:
            chains = [chain(local)]
            listener_filters = []
        else:
            clusters.append(self.inbound_dst_cluster())
            redirected = self.vhost(
                "inbound_original_dst",
                ["*"],
                INBOUND_DST_CLUSTER,
                "ingress",
                request_headers_to_add=[
                    self.core.HeaderValueOption(
                        header=self.core.HeaderValue(key=INBOUND_DST_HEADER, value="127.0.0.1:%DOWNSTREAM_LOCAL_PORT%"),
                        append_action=self.core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
            chains = [chain(redirected)]
            if envoy.local_app is not None:  # a direct connection to the listener's own port
                chains.insert(0, chain(local, destination_port=envoy.ingress_port))
            listener_filters = [
                self.listener_filter("envoy.filters.listener.original_dst", self.original_dst.OriginalDst())
            ]
        listener = ls.Listener(
            name="ingress_https",
            address=self.address(envoy.ingress_address, envoy.ingress_port),
            additional_addresses=self.additional_addresses("::", envoy.ingress_port),
            listener_filters=listener_filters,
            filter_chains=chains,
        )
        return listener, clusters

    def inbound_dst_cluster(self) -> Any:
        """Original-destination cluster whose address comes from a header the route sets (never the client)."""
        c = self.cluster
        return c.Cluster(
            name=INBOUND_DST_CLUSTER,
            type=c.ClusterDiscoveryType.ORIGINAL_DST,
            lb_policy=c.ClusterLbPolicy.CLUSTER_PROVIDED,
            connect_timeout=timedelta(seconds=2),
            original_dst_lb_config=c.ClusterOriginalDstLbConfig(
                use_http_header=True, http_header_name=INBOUND_DST_HEADER
            ),
        )

    # -- the whole bootstrap --------------------------------------------------------------------------
    def build(self) -> RenderedEnvoy:
        settings = self.settings
        authz = settings.listen.authz
        if authz.startswith("unix:"):
            authz_address = self.core.Address(pipe=self.core.Pipe(path=authz[5:]))
        else:
            host, _, port = authz.rpartition(":")
            authz_address = self.address(host, int(port))
        clusters = [self.static_cluster(AUTHZ_CLUSTER, authz_address, http2=True)]
        vhosts, route_clusters, dfp = self.egress_routes()
        egress, egress_clusters = self.egress(vhosts, route_clusters, dfp)
        listeners = [egress]
        clusters += egress_clusters
        if settings.envoy.outbound_port is not None:
            outbound, outbound_clusters = self.outbound(vhosts, dfp)
            if self.xds is None:
                listeners.append(outbound)  # else it comes from LDS (render_dynamic), with the intercepting chains
            clusters += outbound_clusters
        envoy = settings.envoy
        if settings.identity is not None and (envoy.local_app is not None or envoy.inbound_redirect):
            ingress, ingress_clusters = self.ingress()
            listeners.append(ingress)
            clusters += ingress_clusters
        b, core = self.bootstrap, self.core
        extra: dict[str, Any] = {}
        if self.xds is not None:
            if settings.envoy.outbound_port is None:
                clusters.append(self.blackhole_cluster())
            internal = core.Address(
                envoy_internal_address=core.EnvoyInternalAddress(server_listener_name=INTERCEPT_CONNECT)
            )
            clusters.append(self.static_cluster(INTERCEPT_CONNECT, internal))

            def watched(path: Path) -> Any:
                return core.ConfigSource(
                    path_config_source=core.PathConfigSource(
                        path=str(path), watched_directory=core.WatchedDirectory(path=str(path.parent))
                    ),
                    resource_api_version=core.ApiVersion.V3,
                )

            extra["dynamic_resources"] = b.BootstrapDynamicResources(
                lds_config=watched(self.xds.listeners), cds_config=watched(self.xds.clusters)
            )
            extra["bootstrap_extensions"] = [
                core.TypedExtensionConfig(
                    name="envoy.bootstrap.internal_listener",
                    typed_config=self.pack(self.internal_listener.InternalListener()),
                )
            ]
        message = b.Bootstrap(
            node=core.Node(id="agent-authz", cluster="agent-authz"),
            admin=b.Admin(address=self.address("127.0.0.1", settings.envoy.admin_port)),
            static_resources=b.BootstrapStaticResources(listeners=listeners, clusters=clusters),
            **extra,
        )
        return RenderedEnvoy(message.to_dict(), dict(self.files))

    def dynamic(self, targets: list[InterceptTarget], cache: dict[Any, dict[str, Any]]) -> DynamicResources:
        """The listeners and clusters file-based LDS/CDS serve for ``targets``.

        Each piece is rendered once and kept in ``cache`` (the typed classes cost ~25 ms per filter
        chain), so adding a host renders only that host's chains and cluster.
        """

        def memo(key: Any, make: Any) -> dict[str, Any]:
            if key not in cache:
                cache[key] = make().to_dict()
            return copy.deepcopy(cache[key])

        def with_chains(listener: dict[str, Any], chains: list[dict[str, Any]]) -> dict[str, Any]:
            listener["filterChains"] = [*chains, *listener.get("filterChains", [])]
            return listener

        listeners = [
            with_chains(
                memo(("connect",), self.intercept_connect_listener),
                [
                    memo(("chain", t, False), lambda t=t: self.intercept_chain(t, match_port=False))
                    for t in targets
                    if t.port == 443
                ],
            )
        ]
        if self.settings.envoy.outbound_port is not None:
            ports = tuple(sorted({t.port for t in targets}))

            def outbound() -> Any:
                vhosts, _, dfp = self.egress_routes()
                return self.outbound(vhosts, dfp, ports)[0]

            chains = [memo(("chain", t, True), lambda t=t: self.intercept_chain(t, match_port=True)) for t in targets]
            listeners.insert(0, with_chains(memo(("outbound", ports), outbound), chains))
        clusters = [
            memo(
                ("cluster", t),
                lambda t=t: self.tls_cluster(intercept_cluster_name(t), t.host, t.upstream_port, alpn=True),
            )
            for t in targets
        ]
        return DynamicResources(listeners, clusters)


def _sds_dir(loaded: LoadedConfig, out: Path | None) -> Path | None:
    configured = loaded.settings.envoy.sds_dir
    if configured is not None:
        return loaded.resolve(configured).absolute()
    if out is not None:
        return out.absolute().parent / (out.stem + "-sds")
    return None


def render_envoy(loaded: LoadedConfig, *, out: Path | None = None) -> RenderedEnvoy:
    """Build the bootstrap for ``loaded``.

    Args:
        loaded: the validated configuration.
        out: where the bootstrap will be written; file-based SDS resources go to
            ``envoy.sds_dir`` or, by default, ``<out stem>-sds/`` beside it.

    Raises:
        ConfigError: a file identity with an inbound listener, but nowhere to put the SDS files.
    """
    identity = loaded.settings.identity
    sds_dir = _sds_dir(loaded, out)
    envoy = loaded.settings.envoy
    inbound = envoy.local_app is not None or envoy.inbound_redirect
    needs_files = identity is not None and identity.source == "files" and inbound
    if needs_files and sds_dir is None:
        raise ConfigError(str(loaded.source), "envoy.sds_dir", "file identities need envoy.sds_dir (or --out)")
    return _Builder(loaded, sds_dir).build()


def write_envoy(loaded: LoadedConfig, out: Path) -> RenderedEnvoy:
    """Render and write the bootstrap to ``out`` and the SDS files beside it (each atomically)."""
    rendered = render_envoy(loaded, out=out)
    for path, text in [*rendered.files.items(), (out, json.dumps(rendered.bootstrap, indent=2) + "\n")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return rendered


def render_dynamic(
    loaded: LoadedConfig, targets: list[InterceptTarget], cache: dict[Any, dict[str, Any]] | None = None
) -> DynamicResources:
    """The dynamic listeners and clusters of an ``intercept`` configuration (file-based LDS/CDS).

    Args:
        loaded: the configuration the bootstrap was rendered from (the listeners refer to its static
            clusters, so render from the same configuration).
        targets: the intercepted ``host:port`` pairs (sorted here: equal input gives equal output, so
            Envoy keeps the filter chains that did not change and their connections).
        cache: rendered pieces from earlier calls with the same ``loaded`` (filled in; keys name
            their target, so entries of targets gone can be dropped: :func:`prune_render_cache`).

    Raises:
        ValueError: ``loaded`` has no ``intercept`` section.
    """
    if loaded.settings.intercept is None:
        raise ValueError("render_dynamic needs an 'intercept' section")
    return _Builder(loaded, None).dynamic(sorted(targets), cache if cache is not None else {})


def prune_render_cache(cache: dict[Any, dict[str, Any]], targets: frozenset[InterceptTarget]) -> None:
    """Drop the cached pieces of :func:`render_dynamic` that belong to targets not in ``targets``
    (and the listener shells of other sets of intercepted ports)."""
    ports = tuple(sorted({t.port for t in targets}))
    for key in list(cache):
        gone = any(isinstance(part, InterceptTarget) and part not in targets for part in key)
        if gone or (key[0] == "outbound" and key[1] != ports):
            del cache[key]


def render_bootstrap_json(loaded: LoadedConfig) -> str:
    """The bootstrap alone as pretty-printed proto3 JSON (configs without file-based SDS)."""
    return json.dumps(render_envoy(loaded).bootstrap, indent=2) + "\n"
