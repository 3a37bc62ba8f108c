"""What every piece of one rendering shares: Envoy's typed classes, the configuration, small helpers.

The configuration is built from Envoy's own generated protobuf classes (``xds-protos``, upb), so a
wrong field name fails at render time (``ValueError``) and a wrong type too (``TypeError``), and
``envoy --mode validate`` checks the rest; :meth:`Kit.to_dict` gives proto3 JSON. A :class:`Kit`
imports the generated modules it needs (~100 with what they import; ~35 ms) when a rendering
starts, so ``agent-authz serve`` loads them only if it renders the intercept resources.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from sidecar.bootstrap.names import XdsPaths
from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SYSTEM_CA_BUNDLE

__all__ = ["XDS_RETRY_BASE", "XDS_RETRY_MAX", "Kit", "is_ip", "package"]

XDS_RETRY_BASE = timedelta(milliseconds=25)
XDS_RETRY_MAX = timedelta(milliseconds=250)
"""The back-off of Envoy's gRPC xDS streams (:meth:`Kit.xds_grpc`): Envoy may start before the
sidecar (or the SPIRE agent) listens, and then re-opens the stream at most a quarter second after
the socket exists (Envoy's default: 500 ms base, up to 30 s; jittered either way)."""


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP literal (brackets allowed), not a name to resolve."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def package(*modules: ModuleType) -> SimpleNamespace:
    """The messages and enums of generated ``*_pb2`` modules as one namespace (a protobuf package
    spread over several files: ``package(address_pb2, base_pb2).Address``)."""
    names: dict[str, Any] = {}
    for module in modules:
        descriptor = module.DESCRIPTOR
        for name in (*descriptor.message_types_by_name, *descriptor.enum_types_by_name):
            names[name] = getattr(module, name)
    return SimpleNamespace(**names)


class Kit:
    """Envoy's generated protobuf classes (``xds-protos``) and the configuration of one rendering.

    Args:
        loaded: the validated configuration.
        sds_dir: where file-based SDS resources go (file identities), or ``None``.

    Attributes:
        core, listener, route, endpoint, tls, matcher: the protobuf packages
            ``envoy.config.core.v3``, ``envoy.config.listener.v3``, ... as namespaces of their
            messages and enums (:func:`package`); the other attributes named after an Envoy
            extension (``hcm``, ``ext_authz``, ``cluster``, ...) are its ``*_pb2`` module.
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
        from envoy.config.accesslog.v3 import accesslog_pb2
        from envoy.config.bootstrap.v3 import bootstrap_pb2
        from envoy.config.cluster.v3 import cluster_pb2
        from envoy.config.core.v3 import (
            address_pb2,
            backoff_pb2,
            base_pb2,
            config_source_pb2,
            extension_pb2,
            grpc_service_pb2,
            http_uri_pb2,
            protocol_pb2,
            substitution_format_string_pb2,
        )
        from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
        from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
        from envoy.config.route.v3 import route_components_pb2, route_pb2
        from envoy.extensions.access_loggers.stream.v3 import stream_pb2
        from envoy.extensions.bootstrap.internal_listener.v3 import internal_listener_pb2
        from envoy.extensions.clusters.dynamic_forward_proxy.v3 import cluster_pb2 as dfp_cluster_pb2
        from envoy.extensions.common.dynamic_forward_proxy.v3 import dns_cache_pb2
        from envoy.extensions.filters.http.dynamic_forward_proxy.v3 import dynamic_forward_proxy_pb2
        from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
        from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
        from envoy.extensions.filters.http.router.v3 import router_pb2
        from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
        from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
        from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
        from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as net_ext_authz_pb2
        from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
        from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
        from envoy.extensions.transport_sockets.tls.v3 import (
            common_pb2,
            secret_pb2,
            tls_pb2,
            tls_spiffe_validator_config_pb2,
        )
        from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
        from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
        from envoy.type.v3 import http_status_pb2
        from google.protobuf import any_pb2, json_format, struct_pb2, wrappers_pb2

        self.core = package(
            address_pb2,
            backoff_pb2,
            base_pb2,
            config_source_pb2,
            extension_pb2,
            grpc_service_pb2,
            http_uri_pb2,
            protocol_pb2,
            substitution_format_string_pb2,
        )
        self.listener = package(listener_pb2, listener_components_pb2)
        self.route = package(route_pb2, route_components_pb2)
        self.endpoint = package(endpoint_pb2, endpoint_components_pb2)
        self.tls = package(tls_pb2, common_pb2, secret_pb2, tls_spiffe_validator_config_pb2)
        self.matcher = package(string_pb2, regex_pb2, metadata_pb2, value_pb2)
        self.ext_proc = package(ext_proc_pb2, processing_mode_pb2)
        self.accesslog, self.bootstrap, self.cluster, self.stream = (
            accesslog_pb2,
            bootstrap_pb2,
            cluster_pb2,
            stream_pb2,
        )
        self.dfp_cluster, self.dfp_common, self.dfp_filter = dfp_cluster_pb2, dns_cache_pb2, dynamic_forward_proxy_pb2
        self.ext_authz, self.router, self.hcm = ext_authz_pb2, router_pb2, http_connection_manager_pb2
        self.upstream_http, self.types = http_protocol_options_pb2, http_status_pb2
        self.http_inspector, self.original_dst, self.tls_inspector = (
            http_inspector_pb2,
            original_dst_pb2,
            tls_inspector_pb2,
        )
        self.net_ext_authz, self.tcp_proxy = net_ext_authz_pb2, tcp_proxy_pb2
        self.internal_listener = internal_listener_pb2
        self._any, self._struct, self._wrappers, self._json = any_pb2, struct_pb2, wrappers_pb2, json_format
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
        packed = self._any.Any()
        packed.Pack(message)
        return packed

    def struct(self, value: dict[str, Any]) -> Any:
        """``value`` as ``google.protobuf.Struct`` (numbers become doubles, as in every Struct)."""
        struct = self._struct.Struct()
        struct.update(value)
        return struct

    def u32(self, value: int) -> Any:
        """``google.protobuf.UInt32Value`` (a field that tells unset from 0)."""
        return self._wrappers.UInt32Value(value=value)

    def boolean(self, value: bool) -> Any:
        """``google.protobuf.BoolValue`` (a field that tells unset from false)."""
        return self._wrappers.BoolValue(value=value)

    def to_dict(self, message: Any) -> dict[str, Any]:
        """``message`` as proto3 JSON (camelCase names, defaults left out, ``Any`` with ``@type``)."""
        result: dict[str, Any] = self._json.MessageToDict(message)
        return result

    def xds_grpc(self, cluster: str) -> Any:
        """A gRPC xDS config source (SDS) over ``cluster`` (Envoy's own gRPC client), re-opening the
        stream with a back-off from :data:`XDS_RETRY_BASE` to :data:`XDS_RETRY_MAX`
        (``envoy_grpc.retry_policy``, which Envoy reads for xDS streams only)."""
        core = self.core
        retry = core.RetryPolicy(
            retry_back_off=core.BackoffStrategy(base_interval=XDS_RETRY_BASE, max_interval=XDS_RETRY_MAX)
        )
        envoy_grpc = core.GrpcService.EnvoyGrpc(cluster_name=cluster, retry_policy=retry)
        return core.ConfigSource(
            api_config_source=core.ApiConfigSource(
                api_type=core.ApiConfigSource.GRPC,
                transport_api_version=core.ApiVersion.V3,
                grpc_services=[core.GrpcService(envoy_grpc=envoy_grpc)],
            ),
            resource_api_version=core.ApiVersion.V3,
        )

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
