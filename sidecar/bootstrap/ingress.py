"""The ``ingress_https`` listener: mTLS in front of the agent's own app, every request judged.

With an ``identity`` source and ``envoy.local_app`` (or ``envoy.inbound_redirect``): it terminates
mTLS and requires a client certificate; Envoy's certificate and validation context come through
SDS - from the SPIRE agent's SDS (``identity.source: workload_api``; secrets ``default`` and
``ALL``) or from file-based SDS (``identity.source: files``, written by :func:`file_secrets`; Envoy
watches the files, so rotation needs no restart); the validation context is Envoy's SPIFFE validator
with one bundle per trust domain. The client's leaf certificate goes to ext_authz
(``include_peer_certificate``) and its chain in ``x-forwarded-client-cert`` (``SANITIZE_SET``, so
clients cannot forge it), with ``context_extensions: {direction: ingress}``.

With ``envoy.inbound_redirect`` the listener gets ``original_dst``: a redirected connection is
forwarded to ``127.0.0.1:<original port>`` (the agent's app), a direct one to ``local_app``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidecar.bootstrap.clusters import host_port_cluster, inbound_dst_cluster, static_cluster
from sidecar.bootstrap.filters import connection_manager, vhost
from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import (
    BUNDLE_SECRET,
    INBOUND_DST_CLUSTER,
    INBOUND_DST_HEADER,
    INGRESS,
    LOCAL_APP_CLUSTER,
    SPIRE_CLUSTER,
    SVID_SECRET,
)

__all__ = ["file_secrets", "ingress_listener", "sds_secret"]

_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105


def sds_secret(kit: Kit, name: str, file_name: str) -> Any:
    """An SDS secret of the identity source: the SPIRE agent (gRPC, :meth:`Kit.xds_grpc`: Envoy
    re-opens the stream within a quarter second once the agent's socket exists) or ``file_name`` in
    ``sds_dir``."""
    core = kit.core
    identity = kit.settings.identity
    assert identity is not None
    if identity.source == "workload_api":
        source = kit.xds_grpc(SPIRE_CLUSTER)
    else:
        assert kit.sds_dir is not None
        source = core.ConfigSource(
            path_config_source=core.PathConfigSource(
                path=str(kit.sds_dir / file_name), watched_directory=core.WatchedDirectory(path=str(kit.sds_dir))
            ),
            resource_api_version=core.ApiVersion.V3,
        )
    return kit.tls.SdsSecretConfig(name=name, sds_config=source)


def file_secrets(kit: Kit) -> None:
    """Add the file-based SDS resources to ``kit.files``: the SVID and the SPIFFE validation context."""
    identity = kit.settings.identity
    assert identity is not None and identity.files is not None and kit.sds_dir is not None
    files, core, tls = identity.files, kit.core, kit.tls

    def source(path: Path) -> Any:
        resolved = kit.loaded.resolve(path).absolute()
        return core.DataSource(
            filename=str(resolved), watched_directory=core.WatchedDirectory(path=str(resolved.parent))
        )

    svid_path = kit.loaded.resolve(files.svid).absolute()
    svid = tls.Secret(
        name=SVID_SECRET,
        tls_certificate=tls.TlsCertificate(
            certificate_chain=core.DataSource(filename=str(svid_path)),
            private_key=core.DataSource(filename=str(kit.loaded.resolve(files.key).absolute())),
            watched_directory=core.WatchedDirectory(path=str(svid_path.parent)),
        ),
    )
    validator = tls.SPIFFECertValidatorConfig(
        trust_domains=[
            tls.SPIFFECertValidatorConfig.TrustDomain(name=td, trust_bundle=source(path))
            for td, path in sorted(files.bundles.items())
        ]
    )
    bundles = tls.Secret(
        name=BUNDLE_SECRET,
        validation_context=tls.CertificateValidationContext(
            custom_validator_config=core.TypedExtensionConfig(
                name="envoy.tls.cert_validator.spiffe", typed_config=kit.pack(validator)
            )
        ),
    )
    for secret, name in ((svid, "svid.json"), (bundles, "bundles.json")):
        resource = {"@type": _SECRET_TYPE, **kit.to_dict(secret)}
        kit.files[kit.sds_dir / name] = json.dumps({"resources": [resource]}, indent=2) + "\n"


def ingress_listener(kit: Kit) -> tuple[Any, list[Any]]:
    """``ingress_https`` and its clusters (the local app, the SPIRE agent, the redirected destination)."""
    envoy, identity = kit.settings.envoy, kit.settings.identity
    assert identity is not None
    clusters = []
    if envoy.local_app is not None:
        clusters.append(host_port_cluster(kit, LOCAL_APP_CLUSTER, envoy.local_app))
    if identity.source == "workload_api":
        svid_name, bundle_name = identity.workload_api.svid_secret, identity.workload_api.bundle_secret
        socket = identity.workload_api.socket.removeprefix("unix://")
        clusters.append(
            static_cluster(kit, SPIRE_CLUSTER, kit.core.Address(pipe=kit.core.Pipe(path=socket)), http2=True)
        )
    else:
        svid_name, bundle_name = SVID_SECRET, BUNDLE_SECRET
        file_secrets(kit)
    tls = kit.tls
    context = tls.DownstreamTlsContext(
        require_client_certificate=kit.boolean(True),
        common_tls_context=tls.CommonTlsContext(
            tls_params=tls.TlsParameters(tls_minimum_protocol_version=tls.TlsParameters.TLSv1_2),
            tls_certificate_sds_secret_configs=[sds_secret(kit, svid_name, "svid.json")],
            validation_context_sds_secret_config=sds_secret(kit, bundle_name, "bundles.json"),
            alpn_protocols=["h2", "http/1.1"],
        ),
    )
    manager_class, ls = kit.hcm.HttpConnectionManager, kit.listener

    def chain(host: Any, port: int | None = None) -> Any:
        manager = connection_manager(
            kit,
            "ingress_http",
            [host],
            [],
            forward_client_cert_details=manager_class.SANITIZE_SET,
            set_current_client_cert_details=manager_class.SetCurrentClientCertDetails(uri=True, chain=True),
        )
        return ls.FilterChain(
            filter_chain_match=ls.FilterChainMatch(destination_port=kit.u32(port)) if port is not None else None,
            filters=[manager],
            transport_socket=kit.core.TransportSocket(
                name="envoy.transport_sockets.tls", typed_config=kit.pack(context)
            ),
        )

    local = vhost(kit, "local_app", ["*"], LOCAL_APP_CLUSTER, INGRESS)
    if not envoy.inbound_redirect:
        chains = [chain(local)]
        listener_filters = []
    else:
        clusters.append(inbound_dst_cluster(kit))
        redirected = vhost(
            kit,
            "inbound_original_dst",
            ["*"],
            INBOUND_DST_CLUSTER,
            INGRESS,
            request_headers_to_add=[
                kit.core.HeaderValueOption(
                    header=kit.core.HeaderValue(key=INBOUND_DST_HEADER, value="127.0.0.1:%DOWNSTREAM_LOCAL_PORT%"),
                    append_action=kit.core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ],
        )
        chains = [chain(redirected)]
        if envoy.local_app is not None:  # a direct connection to the listener's own port
            chains.insert(0, chain(local, envoy.ingress_port))
        listener_filters = [kit.listener_filter("envoy.filters.listener.original_dst", kit.original_dst.OriginalDst())]
    listener = ls.Listener(
        name="ingress_https",
        address=kit.address(envoy.ingress_address, envoy.ingress_port),
        additional_addresses=kit.additional_addresses("::", envoy.ingress_port),
        listener_filters=listener_filters,
        filter_chains=chains,
    )
    return listener, clusters
