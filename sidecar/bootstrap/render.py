"""Render the Envoy bootstrap (and, for file identities, its SDS files) from ``sidecar.yaml``.

One rendering is a :class:`~sidecar.bootstrap.kit.Kit` (Envoy's typed classes and the configuration)
handed to one module per Envoy resource:

* :mod:`sidecar.bootstrap.egress` - ``egress_http`` (always) and the egress routes;
* :mod:`sidecar.bootstrap.outbound` - ``outbound`` (with ``envoy.outbound_port``), where iptables
  redirects the agent's TCP;
* :mod:`sidecar.bootstrap.ingress` - ``ingress_https`` (with an identity and ``envoy.local_app`` or
  ``envoy.inbound_redirect``) and its file-based SDS;
* :mod:`sidecar.bootstrap.intercept` - with ``intercept``: the file-based LDS/CDS the sidecar
  writes (:func:`render_dynamic`); the bootstrap then names those files and adds the
  ``intercept_connect`` internal listener's cluster;
* :mod:`sidecar.bootstrap.clusters` and :mod:`sidecar.bootstrap.filters` - the pieces they share;
  :mod:`sidecar.bootstrap.names` - the names inside the configuration; :mod:`sidecar.wire` - the
  names Envoy and the sidecar share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.bootstrap.clusters import blackhole_cluster, static_cluster
from sidecar.bootstrap.egress import egress_listener, egress_routes
from sidecar.bootstrap.filters import RE2_PROGRAM_SIZE
from sidecar.bootstrap.ingress import ingress_listener
from sidecar.bootstrap.intercept import DynamicResources, RenderCache, dynamic_resources, prune_render_cache
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import AUTHZ_CLUSTER, AUTHZ_HTTP_CLUSTER, INTERCEPT_CONNECT, InterceptTarget
from sidecar.bootstrap.outbound import outbound_listener
from sidecar.config.loader import LoadedConfig
from sidecar.control_socket import SOCKET_MODE
from sidecar.errors import ConfigError

__all__ = [
    "DynamicResources",
    "RenderedEnvoy",
    "prune_render_cache",
    "render_bootstrap_json",
    "render_dynamic",
    "render_envoy",
    "write_envoy",
]


@dataclass(frozen=True)
class RenderedEnvoy:
    """A bootstrap (proto3 JSON as a dict) and the extra files it references (path -> content)."""

    bootstrap: dict[str, Any]
    files: dict[Path, str] = field(default_factory=dict)


def _bootstrap(kit: Kit) -> RenderedEnvoy:
    settings, core = kit.settings, kit.core
    authz = settings.listen.authz
    if authz.startswith("unix:"):
        authz_address = core.Address(pipe=core.Pipe(path=authz[5:]))
    else:
        host, _, port = authz.rpartition(":")
        authz_address = kit.address(host, int(port))
    clusters = [static_cluster(kit, AUTHZ_CLUSTER, authz_address, http2=True)]
    http_checks = settings.http_checks()
    if http_checks is not None:  # HTTP checks over Envoy's HTTP ext_authz transport (HTTP/1.1)
        if http_checks.startswith("unix:"):
            http_address = core.Address(pipe=core.Pipe(path=http_checks[5:]))
        else:
            host, _, port = http_checks.rpartition(":")
            http_address = kit.address(host.strip("[]"), int(port))
        clusters.append(static_cluster(kit, AUTHZ_HTTP_CLUSTER, http_address))
    routes = egress_routes(kit)
    egress, egress_clusters = egress_listener(kit, routes)
    listeners = [egress]
    clusters += egress_clusters
    envoy = settings.envoy
    if envoy.outbound_port is not None:
        outbound, outbound_clusters = outbound_listener(kit, routes)
        if kit.xds is None:
            listeners.append(outbound)  # else it comes from LDS (render_dynamic), with the intercepting chains
        clusters += outbound_clusters
    if settings.identity is not None and (envoy.local_app is not None or envoy.inbound_redirect):
        ingress, ingress_clusters = ingress_listener(kit)
        listeners.append(ingress)
        clusters += ingress_clusters
    b = kit.bootstrap
    extra: dict[str, Any] = {}
    if envoy.outbound_port is None:  # the CONNECT routes' cluster without intercept (outbound renders it too)
        clusters.append(blackhole_cluster(kit))
    if kit.xds is not None:
        internal = core.Address(
            envoy_internal_address=core.EnvoyInternalAddress(server_listener_name=INTERCEPT_CONNECT)
        )
        # the transport socket carries the CONNECT's filter state
        clusters.append(static_cluster(kit, INTERCEPT_CONNECT, internal, transport_socket=_internal_upstream(kit)))

        def watched(path: Path) -> Any:
            return core.ConfigSource(
                path_config_source=core.PathConfigSource(
                    path=str(path), watched_directory=core.WatchedDirectory(path=str(path.parent))
                ),
                resource_api_version=core.ApiVersion.V3,
            )

        extra["dynamic_resources"] = b.Bootstrap.DynamicResources(
            lds_config=watched(kit.xds.listeners), cds_config=watched(kit.xds.clusters)
        )
        extra["bootstrap_extensions"] = [
            core.TypedExtensionConfig(
                name="envoy.bootstrap.internal_listener",
                typed_config=kit.pack(kit.internal_listener.InternalListener()),
            )
        ]
    if envoy.admin_socket is not None:  # mode 0600: only the proxy user may connect
        admin_address = core.Address(
            pipe=core.Pipe(path=str(kit.loaded.resolve(envoy.admin_socket).absolute()), mode=SOCKET_MODE)
        )
    else:
        admin_address = kit.address("127.0.0.1", envoy.admin_port)
    if http_checks is not None:
        # the answer-header matcher of the HTTP checks is a larger RE2 program than Envoy's default
        # limit of 100 (a limit it enforces when the filter is built, not in --mode validate)
        layer = kit.struct({"re2.max_program_size.error_level": RE2_PROGRAM_SIZE})
        extra["layered_runtime"] = b.LayeredRuntime(layers=[b.RuntimeLayer(name="agent-authz", static_layer=layer)])
    message = b.Bootstrap(
        node=core.Node(id="agent-authz", cluster="agent-authz"),
        admin=b.Admin(address=admin_address),
        static_resources=b.Bootstrap.StaticResources(listeners=listeners, clusters=clusters),
        **extra,
    )
    return RenderedEnvoy(kit.to_dict(message), dict(kit.files))


def _internal_upstream(kit: Kit) -> Any:
    """The transport socket to the ``intercept_connect`` internal listener: plain bytes, and the filter
    state a ``CONNECT`` shared with its upstream (:data:`~sidecar.wire.CONNECT_FILTER_STATE`)."""
    from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2 as internal_upstream
    from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2 as raw_buffer

    raw = kit.core.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=kit.pack(raw_buffer.RawBuffer())
    )
    config = internal_upstream.InternalUpstreamTransport(transport_socket=raw)
    return kit.core.TransportSocket(name="envoy.transport_sockets.internal_upstream", typed_config=kit.pack(config))


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
    return _bootstrap(Kit(loaded, sds_dir))


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
    loaded: LoadedConfig, targets: list[InterceptTarget], cache: RenderCache | None = None
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
    return dynamic_resources(Kit(loaded, None), sorted(targets), cache if cache is not None else {})


def render_bootstrap_json(loaded: LoadedConfig) -> str:
    """The bootstrap alone as pretty-printed proto3 JSON (configs without file-based SDS)."""
    return json.dumps(render_envoy(loaded).bootstrap, indent=2) + "\n"
