"""Envoy clusters: static and DNS endpoints, verifying TLS upstreams, original destinations, the rest.

* ``agent_authz`` (HTTP/2) - the sidecar's gRPC server;
* ``dest|<host>`` - an ``envoy.destinations`` entry; ``tls|dest|<host>`` - a ``tls: originate`` host:
  TLS to ``host:upstream_port`` with SNI ``host``, the chain verified against ``envoy.upstream_ca``
  (default: the system bundle) and the ``dNSName`` SAN ``host``;
* ``dynamic_forward_proxy`` - every other host, resolved by the name the agent used (never the
  original destination IP);
* ``outbound_original_dst`` - TLS the agent passes through goes to its original destination;
  ``blackhole`` - no endpoints (what is never allowed);
* ``inbound_original_dst`` - the inbound listener's redirected connections, addressed by a header
  the route sets.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sidecar.bootstrap.kit import Kit, is_ip
from sidecar.bootstrap.names import BLACKHOLE_CLUSTER, DFP_CLUSTER, INBOUND_DST_CLUSTER, INBOUND_DST_HEADER

__all__ = [
    "blackhole_cluster",
    "dfp_cluster",
    "dns_cache",
    "host_port_cluster",
    "inbound_dst_cluster",
    "original_dst_cluster",
    "static_cluster",
    "tls_cluster",
]

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def static_cluster(
    kit: Kit, name: str, address: Any, *, http2: bool = False, dns: bool = False, transport_socket: Any = None
) -> Any:
    """A cluster with one endpoint (``STRICT_DNS`` when ``dns``); ``http2`` for gRPC upstreams;
    ``transport_socket`` to the endpoint (TLS, the internal upstream), default plain TCP."""
    c, uh = kit.cluster, kit.upstream_http
    options = {}
    if http2:
        protocol = uh.HttpProtocolOptions(
            explicit_http_config=uh.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=kit.core.Http2ProtocolOptions()
            )
        )
        options = {_HTTP_OPTIONS: kit.pack(protocol)}
    return c.Cluster(
        name=name,
        type=c.Cluster.STRICT_DNS if dns else c.Cluster.STATIC,
        connect_timeout=timedelta(seconds=2),
        typed_extension_protocol_options=options,
        load_assignment=kit.endpoint.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                kit.endpoint.LocalityLbEndpoints(
                    lb_endpoints=[kit.endpoint.LbEndpoint(endpoint=kit.endpoint.Endpoint(address=address))]
                )
            ],
        ),
        transport_socket=transport_socket,
    )


def host_port_cluster(kit: Kit, name: str, host_port: str) -> Any:
    """A cluster for ``host:port`` (resolved by DNS unless ``host`` is an IP literal)."""
    host, _, port = host_port.rpartition(":")
    return static_cluster(kit, name, kit.address(host, int(port)), dns=not is_ip(host))


def tls_cluster(kit: Kit, name: str, host: str, port: int, *, alpn: bool = False) -> Any:
    """A cluster opening TLS to ``host:port`` (or the ``envoy.destinations`` address of ``host``)
    with SNI ``host``, verifying the chain against :meth:`Kit.upstream_ca` and the ``dNSName`` SAN
    ``host``. With ``alpn``, HTTP/2 or HTTP/1.1 as the upstream's ALPN says (``auto_config``)."""
    envoy, tls = kit.settings.envoy, kit.tls
    address = envoy.destinations.get(host)
    target = address.rpartition(":")[0] if address is not None else host
    context = tls.UpstreamTlsContext(
        sni=host,
        common_tls_context=tls.CommonTlsContext(
            tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParameters.TLSv1_2),
            validation_context=tls.CertificateValidationContext(
                trusted_ca=kit.core.DataSource(filename=str(kit.upstream_ca())),
                match_typed_subject_alt_names=[
                    tls.SubjectAltNameMatcher(
                        san_type=tls.SubjectAltNameMatcher.DNS,
                        matcher=kit.matcher.StringMatcher(exact=host),
                    )
                ],
            ),
            alpn_protocols=["h2", "http/1.1"] if alpn else [],
        ),
    )
    socket = kit.core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=kit.pack(context))
    cluster = static_cluster(kit, name, kit.address(target, port), dns=not is_ip(target), transport_socket=socket)
    if alpn:
        uh, core = kit.upstream_http, kit.core
        protocol = uh.HttpProtocolOptions(
            auto_config=uh.HttpProtocolOptions.AutoHttpConfig(
                http_protocol_options=core.Http1ProtocolOptions(),
                http2_protocol_options=core.Http2ProtocolOptions(),
            )
        )
        cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(kit.pack(protocol))
    return cluster


def dns_cache(kit: Kit) -> Any:
    """The dynamic forward proxy's DNS cache (shared by its cluster and its filter)."""
    return kit.dfp_common.DnsCacheConfig(name="egress_dns", dns_lookup_family=kit.cluster.Cluster.V4_PREFERRED)


def dfp_cluster(kit: Kit) -> Any:
    """``dynamic_forward_proxy``: the host the agent named, resolved by DNS."""
    c = kit.cluster
    return c.Cluster(
        name=DFP_CLUSTER,
        connect_timeout=timedelta(seconds=2),
        lb_policy=c.Cluster.CLUSTER_PROVIDED,
        cluster_type=c.Cluster.CustomClusterType(
            name="envoy.clusters.dynamic_forward_proxy",
            typed_config=kit.pack(kit.dfp_cluster.ClusterConfig(dns_cache_config=dns_cache(kit))),
        ),
    )


def original_dst_cluster(kit: Kit, name: str) -> Any:
    """The connection's original destination (``SO_ORIGINAL_DST``, restored by ``original_dst``)."""
    c = kit.cluster
    return c.Cluster(
        name=name,
        type=c.Cluster.ORIGINAL_DST,
        lb_policy=c.Cluster.CLUSTER_PROVIDED,
        connect_timeout=timedelta(seconds=2),
    )


def blackhole_cluster(kit: Kit) -> Any:
    """A cluster without endpoints: what reaches it goes nowhere."""
    c = kit.cluster
    return c.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=c.Cluster.STATIC,
        connect_timeout=timedelta(seconds=1),
        load_assignment=kit.endpoint.ClusterLoadAssignment(cluster_name=BLACKHOLE_CLUSTER),
    )


def inbound_dst_cluster(kit: Kit) -> Any:
    """Original-destination cluster whose address comes from a header the route sets (never the client)."""
    c = kit.cluster
    return c.Cluster(
        name=INBOUND_DST_CLUSTER,
        type=c.Cluster.ORIGINAL_DST,
        lb_policy=c.Cluster.CLUSTER_PROVIDED,
        connect_timeout=timedelta(seconds=2),
        original_dst_lb_config=c.Cluster.OriginalDstLbConfig(use_http_header=True, http_header_name=INBOUND_DST_HEADER),
    )
