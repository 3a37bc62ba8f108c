"""agent-authz: an Envoy external-authorization sidecar for AI agents.

The package is organised one concept per module (imports go down this list, never up: the import
graph is checked by ``tests/unit/test_import_graph.py``):

* :mod:`sidecar.wire` - the names Envoy and the sidecar share (context extensions, metadata, headers).
* :mod:`sidecar.errors` - the one error root and its codes; :mod:`sidecar.decision` - request and
  decision values, reason codes.
* :mod:`sidecar.agentproto` - MCP and A2A as task rules: the strict JSON-RPC reader, the rule
  syntax and its judgement, attenuation, ``tools/list`` filtering (no Envoy, no configuration).
* :mod:`sidecar.config` - load, validate and watch ``sidecar.yaml``.
* :mod:`sidecar.http_norm` - canonical host, port and path (RFC 3986).
* :mod:`sidecar.identity` - SPIFFE IDs, SVIDs, trust bundles, identity sources.
* :mod:`sidecar.grants` - signed task grants, delegation, revocation lists.
* :mod:`sidecar.policy` - compiled task index and the decision functions.
* :mod:`sidecar.tokens` - signing keys, JWKS and task-scoped access tokens.
* :mod:`sidecar.state` - the durable enforcement state (SQLite, WAL): what a restart must not forget.
* :mod:`sidecar.runtime` - the active snapshot: assembly, reload and decide, the task API's service.
* :mod:`sidecar.audit` - decision records.
* :mod:`sidecar.envoy_authz` - the only code that touches ext_authz protobufs.
* :mod:`sidecar.bootstrap` - renders the Envoy bootstrap, one module per resource.
* :mod:`sidecar.tls_intercept` - TLS interception: the per-pod CA, its leaves (gRPC SDS), Envoy's
  dynamic listeners and clusters, the agent's trust files and variables.
* :mod:`sidecar.redirect` - the iptables rules that send the agent's TCP to Envoy.
* :mod:`sidecar.inject` - the sidecar-injection admission webhook.
* :mod:`sidecar.authority` - the cluster authority: token issuers upstreams verify, the revocation
  feed (and, in :mod:`sidecar.authority.client`, the sidecar's side of it).
* :mod:`sidecar.admin`, :mod:`sidecar.metrics`, :mod:`sidecar.server`, :mod:`sidecar.cli` - the
  process: admin HTTP, metrics, ``serve``, the command line; :mod:`sidecar.harness` - the process
  harness of the demo and the end-to-end tests.
"""

from __future__ import annotations

import time

__all__ = ["STARTED", "__version__"]

__version__ = "0.1.0"

STARTED = time.monotonic()
"""``time.monotonic()`` when the package was first imported: the start of ``serve``'s startup breakdown."""
