"""The filters every listener is made of: ext_authz (HTTP and network), the HTTP connection manager,
``tcp_proxy``, the access logs - and the per-route config that names a check's context.

* HTTP ext_authz: gRPC to ``agent_authz``, or with HTTP checks (``envoy.authz_transport: http``, the
  default) Envoy's HTTP service to ``agent_authz_http``; ``failure_mode_allow: false``,
  ``envoy.authz_timeout``, ``validate_mutations``, ``include_peer_certificate``; 503 when the sidecar
  does not answer. Each route names its context in ``context_extensions`` (gRPC) and, with HTTP
  checks, in its metadata (:mod:`sidecar.wire`).
* the HTTP connection manager: ``normalize_path``, ``merge_slashes`` and
  ``path_with_escaped_slashes_action: REJECT_REQUEST``, so the upstream receives exactly the
  canonical path the sidecar authorized; ``strip_trailing_host_dot``, so ``Host: api.example.com.``
  takes the route (and the pinned ``envoy.destinations`` address) of ``api.example.com``, as it is
  judged (route matching already ignores case, and ``host:*`` domains take any port); the header
  limits of :mod:`sidecar.wire` rendered explicitly; ext_authz, then the listener's filters, then
  the router; an access log on stdout carrying the decision id from ext_authz dynamic metadata.
* the access logs follow the ``drop-query`` log policy (:data:`LOG_POLICY`): a path is logged
  without its query string (``%REQ_WITHOUT_QUERY(:PATH)%``), no header value but the request id
  and the authority is logged, so a credential an agent or SDK put in a query parameter never
  reaches stdout.
* network ext_authz: one ``Check`` per connection, its context in gRPC initial metadata
  (direction, protocol, ``via``), ``include_tls_session``; then ``tcp_proxy``, which connects
  upstream only once allowed (``ON_DOWNSTREAM_DATA``).
* what Envoy refuses without asking the sidecar - a request it cannot parse (codec errors), ext_authz
  unreachable, a connection that never sends what a check needs - goes to the sidecar over gRPC
  access logging (:func:`refused_log`: only entries without a ``decision_id``), which records each
  as ``refused_by_proxy``: every refused connection leaves a decision record.
* with MCP/A2A hosts (``envoy.rpc_hosts``, or rules with ``protocol: mcp`` / ``a2a``): the
  ext_authz filter can buffer the request body, and only the routes to those hosts switch it on
  (:func:`rpc_route_context`); with an MCP host, the ext_proc filter for ``tools/list`` responses
  (:func:`ext_proc_filter`), off unless such a route switches it on.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sidecar.bootstrap.kit import Kit
from sidecar.bootstrap.names import AUTHZ_CLUSTER, AUTHZ_HTTP_CLUSTER, EGRESS, INGRESS
from sidecar.wire import (
    CONNECT_AUTHORITY_HEADER,
    CONTEXT_BODY_CAP,
    CONTEXT_DIRECTION,
    CONTEXT_HEADER,
    CONTEXT_RPC_BODY_CAP,
    CONTEXT_RPC_PROTOCOL,
    DECISION_ID_HEADER,
    DESTINATION_HEADER,
    DIRECTION_METADATA,
    EXT_PROC_FILTER,
    HTTP_CHECK_PREFIX,
    HTTP_FILTER,
    HTTP_METADATA_KEYS,
    LIST_FILTER_HEADER,
    MAX_REQUEST_HEADERS_COUNT,
    MAX_REQUEST_HEADERS_KB,
    METADATA_DECISION_ID,
    METADATA_NAMESPACE,
    METADATA_REASON,
    NETWORK_FILTER,
    PEER_CERTIFICATE_HEADER,
    PROTOCOL_METADATA,
    REASON_HEADER,
    REFUSED_LOG_PREFIX,
    REMAINING_HEADER,
    RESERVED_HEADER_PREFIX,
    SCHEME_HEADER,
    VIA_METADATA,
    dynamic_metadata_ref,
)

__all__ = [
    "LOG_POLICY",
    "RE2_PROGRAM_SIZE",
    "access_log",
    "body_buffer",
    "body_route_context",
    "connect_route_context",
    "connection_manager",
    "ext_authz_filter",
    "ext_proc_filter",
    "http_service",
    "network_check",
    "refused_log",
    "reserved_header_regex",
    "route_context",
    "route_metadata",
    "rpc_route_context",
    "rpc_route_metadata",
    "strip_reserved",
    "tcp_forward",
    "upstream_header_regex",
    "vhost",
]

_EARLY_DATA_BYTES = 64 * 1024
LOG_POLICY = "drop-query"
"""The name of the access-log redaction policy (docs/concepts/logs.md): paths without their query."""
_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "decision_id": dynamic_metadata_ref(HTTP_FILTER, METADATA_DECISION_ID),
    "reason": dynamic_metadata_ref(HTTP_FILTER, METADATA_REASON),
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream": "%UPSTREAM_HOST%",
    "duration_ms": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "upstream_tls_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}
_TCP_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "listener": "outbound",
    "decision_id": dynamic_metadata_ref(NETWORK_FILTER, METADATA_DECISION_ID),
    "reason": dynamic_metadata_ref(NETWORK_FILTER, METADATA_REASON),
    "sni": "%REQUESTED_SERVER_NAME%",
    "destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "upstream": "%UPSTREAM_HOST%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
}


def _rpc_context(kit: Kit, protocol: str, *, body: bool, **extra: str) -> dict[str, str]:
    extensions = {CONTEXT_DIRECTION: EGRESS, CONTEXT_RPC_PROTOCOL: protocol, **extra}
    if body:
        extensions[CONTEXT_RPC_BODY_CAP] = str(kit.body_cap)
    return extensions


def route_metadata(kit: Kit, direction: str, **extra: str) -> Any | None:
    """The route's metadata: with HTTP checks, its context (the keys of ``context_extensions``)
    under the ext_authz filter's namespace, which the HTTP service sends as
    ``x-agent-authz-context`` (``%METADATA(ROUTE:envoy.filters.http.ext_authz)%``); ``None`` with
    gRPC checks."""
    return _metadata(kit, {CONTEXT_DIRECTION: direction, **extra})


def rpc_route_metadata(kit: Kit, protocol: str, *, body: bool, **extra: str) -> Any | None:
    """:func:`route_metadata` of an MCP/A2A route (see :func:`rpc_route_context`)."""
    return _metadata(kit, _rpc_context(kit, protocol, body=body, **extra))


def _metadata(kit: Kit, context: dict[str, str]) -> Any | None:
    if kit.settings.http_checks() is None:
        return None
    return kit.core.Metadata(filter_metadata={HTTP_FILTER: kit.struct(context)})


def route_context(kit: Kit, direction: str, **extra: str) -> dict[str, Any]:
    """Per-route ext_authz config: the ``context_extensions`` of the route's checks (and, when the
    filter buffers bodies for other routes, no body here). With HTTP checks the same context
    travels in the route's metadata (:func:`route_metadata`)."""
    ea = kit.ext_authz
    extensions = {CONTEXT_DIRECTION: direction, **extra}
    settings = ea.CheckSettings(context_extensions=extensions)
    if kit.rpc_hosts or kit.body_hosts:  # the filter buffers bodies (for other routes): not here
        settings.disable_request_body_buffering = True
    per_route = ea.ExtAuthzPerRoute(check_settings=settings)
    return {HTTP_FILTER: kit.pack(per_route)}


def connect_route_context(kit: Kit, direction: str) -> dict[str, Any]:
    """Per-route config of the ``CONNECT`` route: :func:`route_context`, and with HTTP checks the
    check over gRPC all the same (``check_settings.grpc_service``). Envoy's HTTP ext_authz client
    sends a ``CONNECT``'s check as ``CONNECT host:port`` - without the check prefix and the path,
    and a ``200`` to it would open a tunnel on the check's connection - so the HTTP service cannot
    carry it; gRPC can."""
    config = route_context(kit, direction)
    if kit.settings.http_checks() is None:
        return config
    ea, core = kit.ext_authz, kit.core
    settings = ea.CheckSettings(
        context_extensions={CONTEXT_DIRECTION: direction},
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
        ),
    )
    if kit.rpc_hosts or kit.body_hosts:
        settings.disable_request_body_buffering = True
    return {HTTP_FILTER: kit.pack(ea.ExtAuthzPerRoute(check_settings=settings))}


def body_route_context(kit: Kit, direction: str, **extra: str) -> dict[str, Any]:
    """Per-route config of a plain-HTTP route to an ``approval`` host: the body buffered (up to the
    cap plus one byte) and ``body_cap`` in the context extensions, so an approval binds its digest."""
    ea = kit.ext_authz
    extensions = {CONTEXT_DIRECTION: direction, CONTEXT_BODY_CAP: str(kit.body_cap), **extra}
    settings = ea.CheckSettings(context_extensions=extensions, with_request_body=body_buffer(kit))
    return {HTTP_FILTER: kit.pack(ea.ExtAuthzPerRoute(check_settings=settings))}


def body_buffer(kit: Kit) -> Any:
    """``with_request_body`` of MCP/A2A routes: the raw bytes (``pack_as_bytes``), up to the cap
    plus one byte. ``allow_partial_message: true`` so that a longer body still reaches the
    sidecar (which sees it is over the cap and records ``mcp_body_too_large``): with ``false``,
    Envoy answers 413 itself, unrecorded, and sets the stream's buffer limit to the cap, which
    also fails any response longer than the cap (a large ``tools/list``) with a 500."""
    return kit.ext_authz.BufferSettings(
        max_request_bytes=kit.body_cap + 1, allow_partial_message=True, pack_as_bytes=True
    )


def rpc_route_context(kit: Kit, protocol: str, *, body: bool, **extra: str) -> dict[str, Any]:
    """Per-route config of an MCP/A2A route: ``rpc_protocol`` (and with ``body``, the body
    buffered and ``rpc_body_cap``) in the context extensions; for MCP the ext_proc filter
    switched on (``tools/list`` filtering)."""
    ea = kit.ext_authz
    settings = ea.CheckSettings(context_extensions=_rpc_context(kit, protocol, body=body, **extra))
    if body:
        settings.with_request_body.CopyFrom(body_buffer(kit))
    else:
        settings.disable_request_body_buffering = True
    config = {HTTP_FILTER: kit.pack(ea.ExtAuthzPerRoute(check_settings=settings))}
    if protocol == "mcp":
        enable = kit.route.FilterConfig(
            config=kit.pack(kit.ext_proc.ExtProcPerRoute(overrides=kit.ext_proc.ExtProcOverrides()))
        )
        config[EXT_PROC_FILTER] = kit.pack(enable)
    return config


def ext_authz_filter(kit: Kit) -> Any:
    """The HTTP ext_authz filter, asking the sidecar over gRPC or, with HTTP checks
    (``envoy.authz_transport: http``), over Envoy's HTTP service (:func:`http_service`); fail closed
    either way (503 when the sidecar does not answer, answers garbage or a 5xx)."""
    ea, core = kit.ext_authz, kit.core
    transport: dict[str, Any]
    if kit.settings.http_checks() is None:
        transport = {
            "grpc_service": core.GrpcService(
                envoy_grpc=core.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
                timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
            )
        }
    else:
        m = kit.matcher
        transport = {
            "http_service": http_service(kit),
            # every client header goes to the check, except the client's own x-agent-authz-*: those
            # names carry what Envoy tells the sidecar (the route context, the peer certificate, ...)
            "allowed_headers": m.ListStringMatcher(patterns=[m.StringMatcher(safe_regex=m.RegexMatcher(regex=".*"))]),
            "disallowed_headers": m.ListStringMatcher(
                patterns=[m.StringMatcher(safe_regex=m.RegexMatcher(regex=reserved_header_regex()))]
            ),
        }
    config = ea.ExtAuthz(
        transport_api_version=core.ApiVersion.V3,
        failure_mode_allow=False,
        validate_mutations=True,
        include_peer_certificate=True,
        status_on_error=kit.types.HttpStatus(code=kit.types.StatusCode.ServiceUnavailable),
        # pack_as_bytes is read from here only; each route says whether it buffers
        with_request_body=body_buffer(kit) if kit.rpc_hosts or kit.body_hosts else None,
        **transport,
    )
    return kit.hcm.HttpFilter(name=HTTP_FILTER, typed_config=kit.pack(config))


RE2_PROGRAM_SIZE = 1024
"""``re2.max_program_size.error_level`` with HTTP checks (the bootstrap's runtime layer): the
answer-header matcher of :func:`upstream_header_regex` compiles to ~420 instructions."""
_NOT_UPSTREAM = ("content-length", REMAINING_HEADER, *HTTP_METADATA_KEYS)
"""Names in an allowed check's answer that are not request headers to set (the answer's framing
and the dynamic metadata); with the ``:`` pseudo-headers and ``x-envoy-*`` (Envoy's own, e.g. its
``x-envoy-auth-headers-to-remove`` and ``x-envoy-upstream-service-time``) they never reach the
upstream (the remaining budget, :data:`~sidecar.wire.REMAINING_HEADER`, goes to the client's
response only, as with gRPC). A credential header can have none of these names (the schema refuses them)."""


def upstream_header_regex(
    excluded: tuple[str, ...] = _NOT_UPSTREAM, prefixes: tuple[str, ...] = (":", "x-envoy-")
) -> str:
    """An RE2 expression matching every header name except ``excluded`` and names starting with
    one of ``prefixes`` (RE2 has no negative lookahead: the complement is spelled out over the
    trie of the excluded names). The HTTP service's ``allowed_upstream_headers``: the headers an
    allowed check's answer sets on the request are any names (a rule's credential header), so
    the matcher names what is not one."""
    trie: dict[str | None, Any] = {}
    for word in excluded:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = True  # a word ends here
    for prefix in prefixes:
        node = trie
        for char in prefix:
            node = node.setdefault(char, {})
        node.clear()
        node[None] = True  # everything below is excluded

    def below(node: dict[Any, Any]) -> str | None:
        if None in node:
            return None
        chars = sorted(k for k in node if k)
        options = [] if "" in node else [""]  # the name may end here unless a word ends here
        options.append(f"[^{''.join(re.escape(c) for c in chars)}].*" if chars else ".+")
        for char in chars:
            rest = below(node[char])
            if rest is not None:
                options.append(re.escape(char) + rest)
        return f"(?:{'|'.join(options)})"

    return below(trie) or ""


def reserved_header_regex() -> str:
    """An RE2 expression matching the ``x-agent-authz-*`` names except
    :data:`~sidecar.wire.CONNECT_AUTHORITY_HEADER`: the HTTP service's ``disallowed_headers``. Envoy
    sets that one itself before ext_authz on the intercepting chains (from the tunnel's filter
    state, after removing any the agent sent); every other reserved name in a check is Envoy's own
    (``authorization_request.headers_to_add``), never the client's."""
    rest = CONNECT_AUTHORITY_HEADER.removeprefix(RESERVED_HEADER_PREFIX)
    return re.escape(RESERVED_HEADER_PREFIX) + upstream_header_regex((rest,), ())


def strip_reserved(kit: Kit) -> Any:
    """``header_mutation``, the first filter of every HTTP connection manager with HTTP checks: the
    client's own ``x-agent-authz-*`` headers removed before anything reads the request. With gRPC
    checks the sidecar sees them and removes them itself (``headers_to_remove``); the HTTP service
    never sends them to the sidecar (``disallowed_headers``), so Envoy removes them here - a forged
    ``x-agent-authz-caller`` never reaches an upstream or the local app."""
    from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as rules
    from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2 as hm

    strip = rules.HeaderMutation(
        remove_on_match=rules.HeaderMutation.RemoveOnMatch(
            key_matcher=kit.matcher.StringMatcher(prefix=RESERVED_HEADER_PREFIX)
        )
    )
    return kit.hcm.HttpFilter(
        name="agent_authz.strip_reserved",
        typed_config=kit.pack(hm.HeaderMutation(mutations=hm.Mutations(request_mutations=[strip]))),
    )


def http_service(kit: Kit) -> Any:
    """The ext_authz HTTP service of HTTP checks (:mod:`sidecar.wire` has what Envoy sends and reads).

    The check goes to ``agent_authz_http`` under :data:`~sidecar.wire.HTTP_CHECK_PREFIX`, within
    ``envoy.authz_timeout``; Envoy adds the route's context, the request's scheme, the address the
    client connected to and the client certificate. From the answer: on ``200`` every header but
    the answer's own (:func:`upstream_header_regex`) onto the request, overwriting; on a deny only
    ``content-type``, the decision id and the reason to the client (with the body and status); the
    decision id (and under a budget the calls remaining) on an allowed request's response; the
    metadata headers as dynamic metadata."""
    ea, core, m = kit.ext_authz, kit.core, kit.matcher

    def exact(*names: str) -> Any:
        return m.ListStringMatcher(patterns=[m.StringMatcher(exact=name) for name in names])

    def header(name: str, value: str) -> Any:
        return core.HeaderValue(key=name, value=value)

    return ea.HttpService(
        server_uri=core.HttpUri(
            uri="http://agent-authz",
            cluster=AUTHZ_HTTP_CLUSTER,
            timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
        ),
        path_prefix=HTTP_CHECK_PREFIX,
        authorization_request=ea.AuthorizationRequest(
            headers_to_add=[
                header(CONTEXT_HEADER, f"%METADATA(ROUTE:{HTTP_FILTER})%"),
                header(SCHEME_HEADER, "%REQ(:SCHEME)%"),
                header(DESTINATION_HEADER, "%DOWNSTREAM_LOCAL_ADDRESS%"),
                header(PEER_CERTIFICATE_HEADER, "%DOWNSTREAM_PEER_CERT%"),
            ]
        ),
        authorization_response=ea.AuthorizationResponse(
            allowed_upstream_headers=m.ListStringMatcher(
                patterns=[m.StringMatcher(safe_regex=m.RegexMatcher(regex=upstream_header_regex()))]
            ),
            allowed_client_headers=exact("content-type", DECISION_ID_HEADER, REASON_HEADER),
            allowed_client_headers_on_success=exact(DECISION_ID_HEADER, REMAINING_HEADER),
            dynamic_metadata_from_headers=exact(*HTTP_METADATA_KEYS),
        ),
    )


def ext_proc_filter(kit: Kit) -> Any:
    """Envoy's ext_proc filter for ``tools/list`` responses, off unless a route switches it on:
    response headers sent, the body buffered, the ext_authz metadata forwarded. It runs only for
    a request that ext_authz marked with ``x-agent-authz-list-filter: 1`` (an allowed
    ``tools/list``; ``match_delegate`` skips it for every other request, so other responses
    cost no round trip; the route removes the header before the upstream)."""
    ep, core = kit.ext_proc, kit.core
    from envoy.extensions.common.matching.v3.extension_matcher_pb2 import ExtensionWithMatcher
    from envoy.extensions.filters.common.matcher.action.v3.skip_action_pb2 import SkipFilter
    from envoy.type.matcher.v3.http_inputs_pb2 import HttpRequestHeaderMatchInput
    from xds.core.v3.extension_pb2 import TypedExtensionConfig as XdsExtension
    from xds.type.matcher.v3 import matcher_pb2, string_pb2

    header, body = ep.ProcessingMode.HeaderSendMode, ep.ProcessingMode.BodySendMode
    mode = ep.ProcessingMode(
        request_header_mode=header.SKIP,
        response_header_mode=header.SEND,
        request_body_mode=body.NONE,
        response_body_mode=body.BUFFERED,
        request_trailer_mode=header.SKIP,
        response_trailer_mode=header.SKIP,
    )
    config = ep.ExternalProcessor(
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
        ),
        failure_mode_allow=False,
        processing_mode=mode,
        allow_mode_override=True,
        message_timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
        metadata_options=ep.MetadataOptions(
            forwarding_namespaces=ep.MetadataOptions.MetadataNamespaces(untyped=[METADATA_NAMESPACE])
        ),
    )
    matcher = matcher_pb2.Matcher
    marked = matcher.MatcherList.Predicate.SinglePredicate(
        input=XdsExtension(
            name="list-filter", typed_config=kit.pack(HttpRequestHeaderMatchInput(header_name=LIST_FILTER_HEADER))
        ),
        value_match=string_pb2.StringMatcher(exact="1"),
    )
    skip_unmarked = matcher(
        matcher_list=matcher.MatcherList(
            matchers=[
                matcher.MatcherList.FieldMatcher(
                    predicate=matcher.MatcherList.Predicate(
                        not_matcher=matcher.MatcherList.Predicate(single_predicate=marked)
                    ),
                    on_match=matcher.OnMatch(action=XdsExtension(name="skip", typed_config=kit.pack(SkipFilter()))),
                )
            ]
        )
    )
    wrapped = ExtensionWithMatcher(
        extension_config=core.TypedExtensionConfig(name=EXT_PROC_FILTER, typed_config=kit.pack(config)),
        xds_matcher=skip_unmarked,
    )
    return kit.hcm.HttpFilter(name=EXT_PROC_FILTER, typed_config=kit.pack(wrapped), disabled=True)


def access_log(kit: Kit, log_format: dict[str, str] | None = None) -> Any:
    """A JSON access log on stdout (the HTTP format by default), under the ``drop-query`` policy."""
    from envoy.extensions.formatter.req_without_query.v3.req_without_query_pb2 import ReqWithoutQuery

    formatters = [
        kit.core.TypedExtensionConfig(
            name="envoy.formatter.req_without_query", typed_config=kit.pack(ReqWithoutQuery())
        )
    ]
    log = kit.stream.StdoutAccessLog(
        log_format=kit.core.SubstitutionFormatString(
            json_format=kit.struct(log_format if log_format is not None else _ACCESS_LOG_FORMAT),
            formatters=formatters if log_format is None else [],
        )
    )
    return kit.accesslog.AccessLog(name="envoy.access_loggers.stdout", typed_config=kit.pack(log))


def refused_log(kit: Kit, namespace: str, stat_prefix: str, direction: str = EGRESS) -> Any:
    """gRPC access logging to the sidecar (``agent_authz``) of the requests or connections that carry no
    decision in ``namespace`` (the HTTP or the network ext_authz filter's dynamic metadata): Envoy
    refused them without a Check, or the Check failed. The sidecar records each (``refused_by_proxy``)."""
    from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_log

    core, al, m = kit.core, kit.accesslog, kit.matcher
    common = grpc_log.CommonGrpcAccessLogConfig(
        log_name=f"{REFUSED_LOG_PREFIX}|{direction}|{stat_prefix}",
        grpc_service=core.GrpcService(envoy_grpc=core.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER)),
        transport_api_version=core.ApiVersion.V3,
        buffer_flush_interval=timedelta(milliseconds=200),
    )
    http = namespace == HTTP_FILTER
    config = (
        grpc_log.HttpGrpcAccessLogConfig(common_config=common)
        if http
        else grpc_log.TcpGrpcAccessLogConfig(common_config=common)
    )
    # Envoy's access-log MetadataFilter ignores the matcher's ``invert``: with a present key it logs when
    # the value matches, with an absent one when ``match_if_key_not_found``. A decision id is never null,
    # so ``null_match`` logs exactly the entries without one (with ``present_match`` and ``invert``, as
    # first written, Envoy streamed every request to the sidecar, which parsed and dropped it).
    undecided = al.AccessLogFilter(
        metadata_filter=al.MetadataFilter(
            matcher=m.MetadataMatcher(
                filter=namespace,
                path=[m.MetadataMatcher.PathSegment(key=METADATA_DECISION_ID)],
                value=m.ValueMatcher(null_match=m.ValueMatcher.NullMatch()),
            ),
            match_if_key_not_found=kit.boolean(True),
        )
    )
    name = "envoy.access_loggers.http_grpc" if http else "envoy.access_loggers.tcp_grpc"
    return al.AccessLog(name=name, filter=undecided, typed_config=kit.pack(config))


def connection_manager(
    kit: Kit,
    stat_prefix: str,
    vhosts: list[Any],
    filters: list[Any],
    *,
    validate_clusters: bool | None = None,
    before_authz: list[Any] | None = None,
    **extra: Any,
) -> Any:
    """The egress/ingress HTTP connection manager. ``validate_clusters=False`` for routes to CDS
    clusters, which may arrive after the listener that names them (file-based xDS has no order);
    ``before_authz``: HTTP filters that run before ext_authz (what the check must see)."""
    manager_class = kit.hcm.HttpConnectionManager
    route_config = kit.route.RouteConfiguration(
        name=stat_prefix,
        virtual_hosts=vhosts,
        validate_clusters=kit.boolean(validate_clusters) if validate_clusters is not None else None,
    )
    manager = manager_class(
        stat_prefix=stat_prefix,
        codec_type=manager_class.AUTO,
        normalize_path=kit.boolean(True),
        merge_slashes=True,
        strip_trailing_host_dot=True,
        max_request_headers_kb=kit.u32(MAX_REQUEST_HEADERS_KB),
        common_http_protocol_options=kit.core.HttpProtocolOptions(max_headers_count=kit.u32(MAX_REQUEST_HEADERS_COUNT)),
        path_with_escaped_slashes_action=manager_class.REJECT_REQUEST,
        route_config=route_config,
        http_filters=[
            *([strip_reserved(kit)] if kit.settings.http_checks() is not None else []),
            *(before_authz or []),
            ext_authz_filter(kit),
            *([ext_proc_filter(kit)] if "mcp" in kit.rpc_hosts.values() else []),
            *filters,
            kit.hcm.HttpFilter(name="envoy.filters.http.router", typed_config=kit.pack(kit.router.Router())),
        ],
        access_log=[
            access_log(kit),
            refused_log(kit, HTTP_FILTER, stat_prefix, INGRESS if stat_prefix.startswith(INGRESS) else EGRESS),
        ],
        **extra,
    )
    return kit.listener.Filter(name="envoy.filters.network.http_connection_manager", typed_config=kit.pack(manager))


def vhost(kit: Kit, name: str, domains: list[str], cluster: str, direction: str, **extra: Any) -> Any:
    """A virtual host routing everything to ``cluster``; ``context=`` adds context extensions."""
    r = kit.route
    context = extra.pop("context", {})
    body = bool(extra.pop("body", False))
    # with HTTP checks the context travels in the route's metadata (a body route names its cap too)
    metadata = route_metadata(kit, direction, **({CONTEXT_BODY_CAP: str(kit.body_cap)} if body else {}), **context)
    route = r.Route(match=r.RouteMatch(prefix="/"), route=r.RouteAction(cluster=cluster), metadata=metadata)
    return r.VirtualHost(
        name=name,
        domains=domains,
        routes=[route],
        typed_per_filter_config=(body_route_context if body else route_context)(kit, direction, **context),
        **extra,
    )


def network_check(kit: Kit, protocol: str, *, via: str = "") -> Any:
    """Network ext_authz: one Check per connection, its context in gRPC metadata."""
    core = kit.core
    metadata = [
        core.HeaderValue(key=DIRECTION_METADATA, value=EGRESS),
        core.HeaderValue(key=PROTOCOL_METADATA, value=protocol),
    ]
    if via:
        metadata.append(core.HeaderValue(key=VIA_METADATA, value=via))
    config = kit.net_ext_authz.ExtAuthz(
        stat_prefix=f"{via or 'outbound'}_{protocol}",
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=timedelta(seconds=kit.settings.envoy.authz_timeout),
            initial_metadata=metadata,
        ),
        transport_api_version=core.ApiVersion.V3,
        failure_mode_allow=False,
        include_tls_session=True,
        send_tls_alert_on_denial=protocol == "tls",
    )
    return kit.listener.Filter(name=NETWORK_FILTER, typed_config=kit.pack(config))


def tcp_forward(kit: Kit, stat_prefix: str, cluster: str, *, max_duration: timedelta | None = None) -> Any:
    """``tcp_proxy`` that connects upstream only after the first bytes passed ext_authz; with
    ``max_duration``, the connection is closed after that long (the chains where nothing is ever
    allowed: a connection that sends nothing ends, and its access log entry reaches the sidecar)."""
    tp = kit.tcp_proxy
    config = tp.TcpProxy(
        stat_prefix=stat_prefix,
        cluster=cluster,
        upstream_connect_mode=tp.UpstreamConnectMode.ON_DOWNSTREAM_DATA,
        max_early_data_bytes=kit.u32(_EARLY_DATA_BYTES),
        access_log=[access_log(kit, _TCP_ACCESS_LOG_FORMAT), refused_log(kit, NETWORK_FILTER, stat_prefix)],
        max_downstream_connection_duration=max_duration,
    )
    return kit.listener.Filter(name="envoy.filters.network.tcp_proxy", typed_config=kit.pack(config))
