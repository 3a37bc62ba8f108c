"""An upstream's stock Envoy verifying agent-authz tokens with ``jwt_authn``, as a service owner runs it.

Nothing of agent-authz runs in it: the ``jwt_authn`` filter fetches the issuer's JWKS from the
cluster authority (``remote_jwks`` over HTTPS to the authority's Service name, verified against its
CA) and requires, on every request, a JWT of ``issuer`` for ``audience``. What passes goes to the
service behind it (``upstream``) or gets a direct 200 ``ok``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["jwt_authn_bootstrap"]

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_HCM_NAME = "envoy.filters.network.http_connection_manager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _static_cluster(name: str, address: str, port: int) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def jwt_authn_bootstrap(
    *,
    issuer: str,
    audience: str,
    jwks_host: str,
    jwks_address: str,
    jwks_port: int,
    ca_file: Path,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    upstream: tuple[str, int] | None = None,
    hosts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The bootstrap of the upstream's Envoy.

    Args:
        issuer: the ``iss`` required (``https://<authority>/ns/<namespace>``); its last path
            segment names the JWKS (``/ns/<namespace>/jwks.json``).
        audience: the ``aud`` required.
        jwks_host: the authority's Service name (SNI and the certificate's DNS name).
        jwks_address / jwks_port: where that name is reached.
        ca_file: the CA of the authority's certificate.
        listen: the API listener's address and port (``0``: any free one).
        upstream: the service behind it (``address, port``); ``None``: a direct 200 ``ok``.
        hosts: several APIs behind one listener, ``Host -> audience``: each host requires a token
            for its own audience (``audience`` is then unused) and other hosts get 404.

    Returns:
        An Envoy v3 bootstrap (admin on ``127.0.0.1``, any port).
    """
    if upstream is None:
        route: dict[str, Any] = {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        }
    else:
        route = {"match": {"prefix": "/"}, "route": {"cluster": "service"}}

    def provider(aud: str) -> dict[str, Any]:
        return {
            "issuer": issuer,
            "audiences": [aud],
            "forward": upstream is not None,
            "remote_jwks": {
                "http_uri": {
                    "uri": f"https://{jwks_host}/ns/{issuer.rsplit('/', 1)[1]}/jwks.json",
                    "cluster": "authority",
                    "timeout": "2s",
                },
                "cache_duration": "300s",
            },
        }

    if hosts is None:
        providers = {"agent_authz": provider(audience)}
        rules: list[dict[str, Any]] = [{"match": {"prefix": "/"}, "requires": {"provider_name": "agent_authz"}}]
        virtual_hosts = [{"name": "api", "domains": ["*"], "routes": [route]}]
    else:
        names = {host: host.replace(".", "_").replace("-", "_") for host in hosts}
        providers = {names[host]: provider(aud) for host, aud in hosts.items()}
        rules = [
            {
                "match": {"prefix": "/", "headers": [{"name": ":authority", "string_match": {"exact": host}}]},
                "requires": {"provider_name": names[host]},
            }
            for host in hosts
        ]
        virtual_hosts = [{"name": names[host], "domains": [host], "routes": [route]} for host in hosts]
    manager = {
        "@type": _HCM,
        "stat_prefix": "api",
        "route_config": {"virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {"@type": _JWT, "providers": providers, "rules": rules},
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    authority = _static_cluster("authority", jwks_address, jwks_port)
    authority["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS,
            "sni": jwks_host,
            "common_tls_context": {
                "validation_context": {
                    "trusted_ca": {"filename": str(ca_file)},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": jwks_host}}],
                }
            },
        },
    }
    clusters = [authority]
    if upstream is not None:
        clusters.append(_static_cluster("service", *upstream))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "api",
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
