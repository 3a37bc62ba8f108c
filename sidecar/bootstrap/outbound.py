"""The ``outbound`` listener: where the iptables rules of ``agent-authz iptables`` redirect the agent's TCP.

With ``envoy.outbound_port``. Listener filters ``original_dst``, ``tls_inspector`` and
``http_inspector``. Plain HTTP gets the egress HTTP connection manager and routes
(:mod:`sidecar.bootstrap.egress`) - judged on the Host the agent named and routed by that name,
never to the original destination IP. TLS the agent starts itself goes through the network ext_authz
filter (SNI and original destination; gRPC metadata ``x-agent-authz-protocol: tls``) and then
``tcp_proxy`` to the original destination, connecting upstream only once allowed. Anything else is
asked about as ``tcp`` (always denied) and has only a cluster without endpoints behind it.

With ``intercept`` the listener comes from file-based LDS, with the intercepting chains of
:mod:`sidecar.bootstrap.intercept` in front of these.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sidecar.bootstrap.clusters import blackhole_cluster, original_dst_cluster
from sidecar.bootstrap.egress import EgressRoutes, connect_upgrade
from sidecar.bootstrap.filters import connection_manager, network_check, tcp_forward
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import BLACKHOLE_CLUSTER, ORIGINAL_DST_CLUSTER

__all__ = ["outbound_listener", "silent_limit"]


def silent_limit(kit: Kit) -> timedelta:
    """``envoy.inspect_timeout``: how long the listener filters wait for a connection's first bytes (then it
    is judged as TCP), and how long more a connection on a chain that never allows anything may stay
    open without sending any (then it is closed, and recorded as ``refused_by_proxy``)."""
    return timedelta(seconds=kit.settings.envoy.inspect_timeout)


def outbound_listener(kit: Kit, routes: EgressRoutes, ports: tuple[int, ...] = ()) -> tuple[Any, list[Any]]:
    """The transparent listener (without intercepting chains) and its clusters; ``ports`` are the
    ports that have intercepting chains (each gets its own copy of the generic chains)."""
    vhosts, _, filters = routes
    envoy, ls = kit.settings.envoy, kit.listener
    assert envoy.outbound_port is not None
    clusters = [original_dst_cluster(kit, ORIGINAL_DST_CLUSTER), blackhole_cluster(kit)]

    def generic(port: int | None = None) -> list[Any]:
        """Passthrough/refusal of other TLS, and plain HTTP: for any port, or for ``port``."""
        suffix = f"|{port}" if port is not None else ""
        destination = kit.u32(port) if port is not None else None
        tls = ls.FilterChainMatch(destination_port=destination, transport_protocol="tls")
        http = ls.FilterChainMatch(
            destination_port=destination,
            transport_protocol="raw_buffer",
            application_protocols=["http/1.0", "http/1.1", "h2c"],
        )
        return [
            ls.FilterChain(
                name="outbound_tls" + suffix,
                filter_chain_match=tls,
                filters=[network_check(kit, "tls"), tcp_forward(kit, "outbound_tls", ORIGINAL_DST_CLUSTER)],
            ),
            ls.FilterChain(
                name="outbound_http" + suffix,
                filter_chain_match=http,
                filters=[connection_manager(kit, "outbound_http", vhosts, filters, **connect_upgrade(kit))],
            ),
        ]

    # Envoy matches the destination port first and never falls back to chains without one: every
    # port that has intercepting chains gets its own copy of the other chains.
    per_port = [chain for port in ports for chain in generic(port)]
    listener = ls.Listener(
        name="outbound",
        address=kit.address(envoy.outbound_address, envoy.outbound_port),
        additional_addresses=kit.additional_addresses("::1", envoy.outbound_port),
        listener_filters=[
            kit.listener_filter("envoy.filters.listener.original_dst", kit.original_dst.OriginalDst()),
            kit.listener_filter("envoy.filters.listener.tls_inspector", kit.tls_inspector.TlsInspector()),
            kit.listener_filter("envoy.filters.listener.http_inspector", kit.http_inspector.HttpInspector()),
        ],
        filter_chains=[*per_port, *generic()],
        # a connection the inspectors cannot classify in time (it sends nothing, or a first line longer
        # than they read) goes on to the tcp chain: refused there with a record, not reset unrecorded
        listener_filters_timeout=silent_limit(kit),
        continue_on_listener_filters_timeout=True,
        default_filter_chain=ls.FilterChain(
            name="outbound_tcp",
            filters=[
                network_check(kit, "tcp"),
                tcp_forward(kit, "outbound_tcp", BLACKHOLE_CLUSTER, max_duration=silent_limit(kit)),
            ],
        ),
    )
    return listener, clusters
