"""Names inside the rendered Envoy configuration: clusters, listeners, secrets, the xDS files.

Names Envoy and the sidecar process both use (context extensions, metadata, SDS secrets of the
intercepted hosts) are in :mod:`sidecar.wire`; these are the bootstrap's own, plus the two values
the dynamic (intercept) resources are rendered for: :class:`InterceptTarget` and :class:`XdsPaths`.
Cheap to import (no Envoy classes), so the sidecar's intercept manager uses them too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sidecar.decision import Direction

__all__ = [
    "AUTHZ_CLUSTER",
    "AUTHZ_HTTP_CLUSTER",
    "BLACKHOLE_CLUSTER",
    "BUNDLE_SECRET",
    "DFP_CLUSTER",
    "EGRESS",
    "INBOUND_DST_CLUSTER",
    "INBOUND_DST_HEADER",
    "INGRESS",
    "INTERCEPT_CONNECT",
    "LOCAL_APP_CLUSTER",
    "ORIGINAL_DST_CLUSTER",
    "SPIRE_CLUSTER",
    "SVID_SECRET",
    "InterceptTarget",
    "XdsPaths",
    "destination_cluster_name",
    "intercept_cluster_name",
]

EGRESS, INGRESS = Direction.EGRESS.value, Direction.INGRESS.value
"""The ``direction`` context extension of the routes of each side."""

AUTHZ_CLUSTER = "agent_authz"
"""The sidecar's gRPC server: ext_authz ``Check`` and the intercept leaves' SDS."""
AUTHZ_HTTP_CLUSTER = "agent_authz_http"
"""The sidecar's ext_authz HTTP service (HTTP/1.1), for HTTP checks with ``envoy.authz_transport: http``."""
DFP_CLUSTER = "dynamic_forward_proxy"
LOCAL_APP_CLUSTER = "local_app"
ORIGINAL_DST_CLUSTER = "outbound_original_dst"
BLACKHOLE_CLUSTER = "blackhole"
INBOUND_DST_CLUSTER = "inbound_original_dst"
INBOUND_DST_HEADER = "x-agent-authz-inbound-dst"
"""Set by the inbound route (overwriting any client value) to the original destination; read by
:data:`INBOUND_DST_CLUSTER`. Envoy-internal: the sidecar never sees it."""
INTERCEPT_CONNECT = "intercept_connect"
"""The internal listener (and the cluster reaching it) that ``CONNECT host:443`` tunnels end in."""
SPIRE_CLUSTER = "spire_agent"
SVID_SECRET = "spiffe_svid"  # noqa: S105 - an SDS resource name, not a secret
BUNDLE_SECRET = "spiffe_bundles"  # noqa: S105


@dataclass(frozen=True, order=True, slots=True)
class InterceptTarget:
    """One intercepted server name and port (a filter chain, a cluster and a leaf each).

    Attributes:
        host: the exact DNS name (SNI and certificate ``dNSName``).
        port: the port the agent connects to (the original destination port; 443 through ``CONNECT``).
        upstream_port: the port Envoy opens the verified TLS connection to.
    """

    host: str
    port: int
    upstream_port: int


@dataclass(frozen=True)
class XdsPaths:
    """The layout of ``intercept.state_dir`` (an absolute path): what the bootstrap names and the
    sidecar writes."""

    state_dir: Path

    @property
    def xds_dir(self) -> Path:
        """Directory Envoy watches for LDS and CDS."""
        return self.state_dir / "xds"

    @property
    def listeners(self) -> Path:
        """The LDS file."""
        return self.xds_dir / "listeners.json"

    @property
    def clusters(self) -> Path:
        """The CDS file."""
        return self.xds_dir / "clusters.json"

    @property
    def ca_dir(self) -> Path:
        """Where the pod CA is kept across restarts of the sidecar."""
        return self.state_dir / "ca"


def destination_cluster_name(host: str) -> str:
    """The cluster of an ``envoy.destinations`` host: ``dest|<host>`` (odd characters replaced)."""
    return "dest|" + re.sub(r"[^a-z0-9._-]", "_", host)


def intercept_cluster_name(target: InterceptTarget) -> str:
    """The CDS cluster re-originating TLS for ``target``: ``intercept|<host>|<upstream port>``."""
    return f"intercept|{target.host}|{target.upstream_port}"
