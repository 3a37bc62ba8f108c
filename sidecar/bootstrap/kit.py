"""What every piece of one rendering shares: Envoy's typed classes, the configuration, small helpers.

The configuration is built from envoy-data-plane's typed message classes (betterproto2 + pydantic),
so a wrong field name or type fails at render time, and ``envoy --mode validate`` checks the rest.
These classes are slow to import (~1 s): a :class:`Kit` imports them when a rendering starts, and
``agent-authz serve`` never loads them unless it renders the intercept resources.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from sidecar.bootstrap.names import XdsPaths
from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SYSTEM_CA_BUNDLE

__all__ = ["Kit", "is_ip"]


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal (brackets allowed), not a name to resolve."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Kit:
    """The envoy-data-plane modules and the configuration of one rendering.

    Args:
        loaded: the validated configuration.
        sds_dir: where file-based SDS resources go (file identities), or ``None``.

    Attributes:
        loaded / settings: the configuration.
        sds_dir: as given.
        rpc_hosts: ``host -> mcp|a2a`` of the MCP/A2A hosts (:meth:`~sidecar.config.schema.SidecarConfig.rpc_hosts`).
        body_hosts: the plain-HTTP hosts whose route buffers the body
            (:meth:`~sidecar.config.schema.SidecarConfig.approval_hosts`).
        body_cap: ``envoy.rpc_body_cap`` in bytes.
        files: extra files the rendering produced (path -> content), written beside the bootstrap.
        xds: the intercept state layout, with an ``intercept`` section (else ``None``).
    """

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
        self.body_hosts = frozenset(loaded.settings.approval_hosts())
        self.body_cap = int(loaded.settings.envoy.rpc_body_cap)
        self.sds_dir = sds_dir
        self.files: dict[Path, str] = {}
        intercept = self.settings.intercept
        self.xds = XdsPaths(loaded.resolve(intercept.state_dir).absolute()) if intercept is not None else None

    def pack(self, message: Any) -> Any:
        """``message`` as ``google.protobuf.Any`` (typed configs)."""
        return self.pb.Any.pack(message)

    def address(self, host: str, port: int) -> Any:
        """A socket address (brackets of an IPv6 literal removed)."""
        return self.core.Address(socket_address=self.core.SocketAddress(address=host.strip("[]"), port_value=port))

    def listener_filter(self, name: str, config: Any) -> Any:
        """A listener filter (``original_dst``, ``tls_inspector``, ``http_inspector``)."""
        return self.listener.ListenerFilter(name=name, typed_config=self.pack(config))

    def additional_addresses(self, host: str, port: int) -> list[Any]:
        """The IPv6 twin of a listener address, with ``envoy.ipv6``."""
        if not self.settings.envoy.ipv6:
            return []
        return [self.listener.AdditionalAddress(address=self.address(host, port))]

    def upstream_ca(self) -> Path:
        """The bundle upstream certificates are verified against (``envoy.upstream_ca``, else the system's)."""
        envoy = self.settings.envoy
        return self.loaded.resolve(envoy.upstream_ca).absolute() if envoy.upstream_ca is not None else SYSTEM_CA_BUNDLE
