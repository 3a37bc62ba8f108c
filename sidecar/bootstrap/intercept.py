"""The intercept resources (``tls: intercept`` rules): file-based LDS and CDS, rendered per target.

The filter chains that terminate the agent's TLS change with the active tasks, which a static
bootstrap cannot do. So the ``outbound`` listener and the internal listener ``intercept_connect``
come from file-based LDS, and the verifying upstream clusters from file-based CDS, in
``intercept.state_dir`` - written by the sidecar (:mod:`sidecar.tls_intercept.manager`) with
:func:`dynamic_resources`, the same code as the rest of the bootstrap. Per intercepted ``host:port``
(:class:`~sidecar.bootstrap.names.InterceptTarget`):

* a filter chain matching the SNI (and, on ``outbound``, the original destination port) that
  terminates TLS with the host's pod-CA leaf (gRPC SDS from the sidecar, over the ``agent_authz``
  cluster: the key never touches a disk; ALPN ``h2``, ``http/1.1``);
* then the egress HTTP connection manager with ext_authz (``context_extensions`` ``intercept:
  host:port``, ``upstream_verify``) and a route to a cluster that opens a new TLS connection to the
  host (``envoy.destinations`` address, else DNS) with SNI = the host, verifying the chain against
  ``envoy.upstream_ca`` (default: the system bundle) and the ``dNSName`` SAN;
* an upstream that fails is a 502 (``local_reply_config`` on ``UF``) and Envoy's access log carries
  ``upstream_tls_failure``; a request naming another host or port than the SNI gets 421.

``intercept_connect`` takes the ``CONNECT host:443`` tunnels of ``egress_http``; its chains are the
same (port 443 only); a connection there that no chain takes is asked about
(``x-agent-authz-via: connect``) and closed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.bootstrap.clusters import tls_cluster
from sidecar.bootstrap.egress import egress_routes
from sidecar.bootstrap.filters import (
    connection_manager,
    network_check,
    route_context,
    route_metadata,
    tcp_forward,
    vhost,
)
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import (
    AUTHZ_CLUSTER,
    BLACKHOLE_CLUSTER,
    EGRESS,
    INTERCEPT_CONNECT,
    InterceptTarget,
    intercept_cluster_name,
)
from sidecar.bootstrap.outbound import outbound_listener, silent_limit
from sidecar.wire import (
    CONNECT_AUTHORITY_HEADER,
    CONNECT_FILTER_STATE,
    CONNECT_VIA,
    CONTEXT_INTERCEPT,
    CONTEXT_UPSTREAM_VERIFY,
    HTTP_FILTER,
    METADATA_DECISION_ID,
    dynamic_metadata_ref,
    intercept_secret_name,
)

__all__ = [
    "DynamicResources",
    "RenderCache",
    "dynamic_resources",
    "intercept_chain",
    "intercept_connect_listener",
    "prune_render_cache",
    "upstream_verify",
]

RenderCache = dict[Any, dict[str, Any]]
"""Rendered pieces (proto3 JSON) by what they were rendered for (see :func:`dynamic_resources`)."""

_UPSTREAM_FAILURE_BODY = {
    "decision_id": dynamic_metadata_ref(HTTP_FILTER, METADATA_DECISION_ID),
    "reason": "upstream_failed",
    "detail": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}


@dataclass(frozen=True)
class DynamicResources:
    """What file-based LDS and CDS serve (proto3 JSON dicts, without ``@type``)."""

    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]


def upstream_verify(kit: Kit, host: str) -> str:
    """What the intercept cluster of ``host`` checks, as recorded in decisions."""
    return f"dns:{host} ca:{kit.upstream_ca()}"


def _leaf_secret(kit: Kit, host: str) -> Any:
    """The leaf of ``host`` from the sidecar's gRPC SDS (:mod:`sidecar.tls_intercept.sds`), over
    ``agent_authz`` (:meth:`Kit.xds_grpc`: Envoy may start before the sidecar, and re-opens the
    stream within a quarter second once the sidecar's socket exists)."""
    return kit.tls.SdsSecretConfig(name=intercept_secret_name(host), sds_config=kit.xds_grpc(AUTHZ_CLUSTER))


def _connect_authority(kit: Kit) -> Any:
    """``header_mutation`` before ext_authz: :data:`~sidecar.wire.CONNECT_AUTHORITY_HEADER` removed, then
    set from the tunnel's :data:`~sidecar.wire.CONNECT_FILTER_STATE` when there is one (a connection
    the iptables rules redirected has none: the header stays absent, whatever the agent sent)."""
    from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as rules
    from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm

    core = kit.core
    set_from_state = core.HeaderValueOption(
        header=core.HeaderValue(key=CONNECT_AUTHORITY_HEADER, value=f"%FILTER_STATE({CONNECT_FILTER_STATE}:PLAIN)%"),
        append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        keep_empty_value=False,
    )
    mutations = hm.Mutations(
        request_mutations=[
            rules.HeaderMutation(remove=CONNECT_AUTHORITY_HEADER),
            rules.HeaderMutation(append=set_from_state),
        ]
    )
    return kit.hcm.HttpFilter(
        name="envoy.filters.http.header_mutation", typed_config=kit.pack(hm.HeaderMutation(mutations=mutations))
    )


def intercept_chain(kit: Kit, target: InterceptTarget, *, match_port: bool) -> Any:
    """Terminate TLS for ``target.host`` with its pod-CA leaf, judge each request, re-originate TLS."""
    ls, r, tls, hcm = kit.listener, kit.route, kit.tls, kit.hcm
    host, port = target.host, target.port
    context = {CONTEXT_INTERCEPT: f"{host}:{port}", CONTEXT_UPSTREAM_VERIFY: upstream_verify(kit, host)}
    cluster = intercept_cluster_name(target)
    domains = [host, f"{host}:{port}"]
    allowed = vhost(kit, cluster, domains, cluster, EGRESS, context=context)
    refuse = r.Route(
        match=r.RouteMatch(prefix="/"),
        direct_response=r.DirectResponseAction(status=421),
        metadata=route_metadata(kit, EGRESS, **context),
    )
    misdirected = r.VirtualHost(
        name="misdirected",
        domains=["*"],
        routes=[refuse],
        typed_per_filter_config=route_context(kit, EGRESS, **context),
    )
    failure = kit.core.SubstitutionFormatString(json_format=kit.struct(_UPSTREAM_FAILURE_BODY))
    local_reply = hcm.LocalReplyConfig(
        mappers=[
            hcm.ResponseMapper(
                filter=kit.accesslog.AccessLogFilter(
                    response_flag_filter=kit.accesslog.ResponseFlagFilter(flags=["UF"])
                ),
                status_code=kit.u32(502),
                body_format_override=failure,
            )
        ]
    )
    manager = connection_manager(
        kit,
        "outbound_intercept",
        [allowed, misdirected],
        [],
        local_reply_config=local_reply,
        validate_clusters=False,
        before_authz=[_connect_authority(kit)],
    )
    downstream = tls.DownstreamTlsContext(
        common_tls_context=tls.CommonTlsContext(
            tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParameters.TLSv1_2),
            tls_certificate_sds_secret_configs=[_leaf_secret(kit, host)],
            alpn_protocols=["h2", "http/1.1"],
        )
    )
    match = ls.FilterChainMatch(
        destination_port=kit.u32(port) if match_port else None, server_names=[host], transport_protocol="tls"
    )
    return ls.FilterChain(
        name=f"intercept|{host}:{port}",
        filter_chain_match=match,
        filters=[manager],
        transport_socket=kit.core.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=kit.pack(downstream)
        ),
    )


def intercept_connect_listener(kit: Kit) -> Any:
    """The internal listener ``CONNECT host:443`` tunnels end in (the intercepting chains of port 443
    are added by :func:`dynamic_resources`)."""
    ls = kit.listener
    return ls.Listener(
        name=INTERCEPT_CONNECT,
        internal_listener=ls.Listener.InternalListenerConfig(),
        listener_filters=[
            kit.listener_filter("envoy.filters.listener.tls_inspector", kit.tls_inspector.TlsInspector())
        ],
        listener_filters_timeout=silent_limit(kit),
        continue_on_listener_filters_timeout=True,
        default_filter_chain=ls.FilterChain(
            name="intercept_connect_other",
            filters=[
                network_check(kit, "tls", via=CONNECT_VIA),
                tcp_forward(kit, "intercept_connect", BLACKHOLE_CLUSTER, max_duration=silent_limit(kit)),
            ],
        ),
    )


def dynamic_resources(kit: Kit, targets: list[InterceptTarget], cache: RenderCache) -> DynamicResources:
    """The listeners and clusters file-based LDS/CDS serve for ``targets``.

    Each piece is rendered once and kept in ``cache`` as proto3 JSON (a target's two chains and its
    cluster take ~2.5 ms), so adding a host renders only that host's chains and cluster.
    """

    def memo(key: Any, make: Callable[[], Any]) -> dict[str, Any]:
        if key not in cache:
            cache[key] = kit.to_dict(make())
        return copy.deepcopy(cache[key])

    def with_chains(listener: dict[str, Any], chains: list[dict[str, Any]]) -> dict[str, Any]:
        listener["filterChains"] = [*chains, *listener.get("filterChains", [])]
        return listener

    def chain(target: InterceptTarget, match_port: bool) -> dict[str, Any]:
        return memo(("chain", target, match_port), lambda: intercept_chain(kit, target, match_port=match_port))

    def cluster(target: InterceptTarget) -> dict[str, Any]:
        name = intercept_cluster_name(target)
        return memo(("cluster", target), lambda: tls_cluster(kit, name, target.host, target.upstream_port, alpn=True))

    listeners = [
        with_chains(
            memo(("connect",), lambda: intercept_connect_listener(kit)),
            [chain(t, False) for t in targets if t.port == 443],
        )
    ]
    if kit.settings.envoy.outbound_port is not None:
        ports = tuple(sorted({t.port for t in targets}))

        def outbound() -> Any:
            return outbound_listener(kit, egress_routes(kit), ports)[0]

        listeners.insert(0, with_chains(memo(("outbound", ports), outbound), [chain(t, True) for t in targets]))
    clusters = [cluster(t) for t in targets]
    return DynamicResources(listeners, clusters)


def prune_render_cache(cache: RenderCache, targets: frozenset[InterceptTarget]) -> None:
    """Drop the cached pieces of :func:`dynamic_resources` that belong to targets not in ``targets``
    (and the listener shells of other sets of intercepted ports)."""
    ports = tuple(sorted({t.port for t in targets}))
    for key in list(cache):
        gone = any(isinstance(part, InterceptTarget) and part not in targets for part in key)
        if gone or (key[0] == "outbound" and key[1] != ports):
            del cache[key]
