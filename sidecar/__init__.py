"""agent-authz: an Envoy external-authorization sidecar for AI agents.

The package is organised one concept per module:

* :mod:`sidecar.config` - load, validate and watch ``sidecar.yaml``.
* :mod:`sidecar.http_norm` - canonical host, port and path (RFC 3986).
* :mod:`sidecar.policy` - compiled task index and the decision function.
* :mod:`sidecar.tokens` - signing keys, JWKS and task-scoped access tokens.
* :mod:`sidecar.audit` - decision records.
* :mod:`sidecar.envoy_authz` - the only code that touches Envoy protobufs.
* :mod:`sidecar.bootstrap` - renders the Envoy bootstrap.
* :mod:`sidecar.tls_intercept` - HTTPS interception: the per-pod CA, its leaves (gRPC SDS), Envoy's
  dynamic listeners and clusters, the agent's trust files and variables.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
