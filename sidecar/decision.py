"""The request and decision values exchanged between the protocol edge and the policy code.

Neither type knows about Envoy protobufs: :mod:`sidecar.envoy_authz` translates CheckRequest into
:class:`AuthzRequest` (reading the names of :mod:`sidecar.wire` into typed fields) and
:class:`Decision` into CheckResponse.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "AuthzRequest",
    "Decision",
    "Direction",
    "Interception",
    "Protocol",
    "ProxyRefusal",
    "Reason",
    "RpcRoute",
    "TokenInfo",
    "deny_status",
]


class Direction(enum.StrEnum):
    """Which side of the agent a request is on."""

    EGRESS = "egress"
    INGRESS = "ingress"
    LOCAL = "local"
    """The local agent asked its own sidecar (the task API), e.g. to revoke another agent's task."""
    CONTROL = "control"
    """A control record: an operator's signed action (freeze, unfreeze, kill, approval) or the
    sidecar's own continuous-verification step (a quarantine), not a call."""


class Protocol(enum.StrEnum):
    """What Envoy saw on the connection: an HTTP request, or a connection it cannot look into.

    ``tls`` and ``tcp`` come only from the transparent ``outbound`` listener (network ext_authz):
    a TLS connection the agent started itself (judged on SNI and original destination), or a
    connection that is neither HTTP nor TLS. ``dns`` is a query the sidecar's DNS proxy answered.
    """

    HTTP = "http"
    TLS = "tls"
    TCP = "tcp"
    DNS = "dns"
    """A query to the sidecar's DNS proxy (the agent's DNS, redirected): judged on the name."""


class Reason(enum.StrEnum):
    """Stable reason codes. They appear in deny bodies, the ``x-agent-authz-reason`` header, decision
    records, metrics labels and Envoy's dynamic metadata.

    Never rename a member: dashboards and alerts key on these strings. Each member's docstring is its
    meaning on the generated page ``docs/reference/reasons.md``.
    """

    ALLOWED = "allowed"
    """A task rule allows the call (ingress: a rule admits the verified caller)."""
    BAD_REQUEST = "bad_request"
    """The request cannot be judged safely: a malformed or ambiguous host, path or method, an encoded
    ``/`` or ``\\`` in the path, an undecodable or oversized (over 96 KiB) CheckRequest, or one without
    HTTP attributes or a ``direction``; on the transparent listener also an IP literal or odd
    characters as SNI."""
    NO_CLIENT_IDENTITY = "no_client_identity"
    """Ingress: no client certificate and no JWT-SVID."""
    UNTRUSTED_IDENTITY = "untrusted_identity"
    """Ingress: the caller's SVID failed verification; ``detail`` starts with a stable sub-code, an
    ``svid_*`` or ``jwt_svid_*`` member of :class:`~sidecar.errors.SvidDetail` such as
    ``svid_expired``, ``svid_chain_invalid``, ``jwt_svid_bad_signature`` or ``jwt_svid_bad_audience``
    (the reference page of reasons lists them all, with their meanings)."""
    CALLER_NOT_ALLOWED = "caller_not_allowed"
    """Ingress: a verified caller that no rule names (for this method and path)."""
    NO_TASK = "no_task"
    """No task is declared for this agent."""
    UNKNOWN_TASK = "unknown_task"
    """``x-agent-task`` names no declared task."""
    TASK_NOT_FOR_AGENT = "task_not_for_agent"
    """``x-agent-task`` names another agent's task."""
    TASK_AMBIGUOUS = "task_ambiguous"
    """Several active tasks allow the call and none was named with ``x-agent-task``."""
    TASK_NOT_YET_VALID = "task_not_yet_valid"
    """Before the task's ``not_before``."""
    TASK_EXPIRED = "task_expired"
    """Past the task's ``expires_at`` or ``ttl`` (a grant's expiry included)."""
    TASK_REVOKED = "task_revoked"
    """The task is revoked: ``revoked: true``, its ``revoked`` file, or a revocation list naming it or
    an ancestor."""
    HOST_NOT_ALLOWED = "host_not_allowed"
    """No rule of the task names this host."""
    PORT_NOT_ALLOWED = "port_not_allowed"
    """The host is allowed, on another port."""
    METHOD_NOT_ALLOWED = "method_not_allowed"
    """Host and port are allowed, not this method."""
    PATH_NOT_ALLOWED = "path_not_allowed"
    """Host, port and method are allowed, not this path."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The rule's or the task's ``max_calls`` is spent."""
    INTERNAL_ERROR = "internal_error"
    """An unexpected failure, including an allow whose decision record could not be written (with
    ``decision_log.on_log_failure: deny``)."""
    DRY_RUN = "dry_run"
    """Dry-run mode let through a call the policy denies; ``would_reason`` says why."""
    TLS_NOT_ALLOWED = "tls_not_allowed"
    """Transparent egress: a TLS connection to a host whose rules have no ``tls: passthrough`` (the
    connection is closed); a ``CONNECT host:port`` whose rules do not give it ``tls: intercept`` (403:
    a tunnel carries only HTTPS the sidecar reads); a tunnel's TLS to a name no task intercepts."""
    NO_SNI = "no_sni"
    """Transparent egress: a TLS ClientHello without a server name (closed)."""
    TCP_NOT_ALLOWED = "tcp_not_allowed"
    """Transparent egress: a connection that is neither HTTP nor TLS (closed)."""
    UNKNOWN_DESTINATION = "unknown_destination"
    """Transparent egress: no usable original destination - the connection was not redirected to the
    listener (closed)."""
    TLS_ORIGINATION_UNAVAILABLE = "tls_origination_unavailable"
    """The rule says ``tls: originate`` but the request came through an Envoy route that sends plain
    HTTP (a bootstrap rendered before the rule existed): re-render and restart Envoy."""
    MISDIRECTED_REQUEST = "misdirected_request"
    """An intercepted TLS connection (``tls: intercept``) carried a request for another host or port than
    the one its SNI named (RFC 9110 §7.4), or a ``CONNECT`` tunnel carried TLS for another name than the
    ``CONNECT`` did."""
    NOT_AUTHORIZED = "not_authorized"
    """Task API (direction ``local``): the local agent asked to revoke or delegate a task its signature
    has no authority over - another agent's task, or one from the configuration. Control API (direction
    ``control``): an action, approval or operator token that is unsigned, signed by nobody trusted, or by
    a signer without authority over its target. Nothing changed."""
    MCP_HEADER_MISMATCH = "mcp_header_mismatch"
    """``Mcp-Method`` / ``Mcp-Name`` are malformed, missing where required, or disagree with the body."""
    MCP_AMBIGUOUS_BODY = "mcp_ambiguous_body"
    """A JSON-RPC body two readers could read differently (duplicate names, a batch, not UTF-8, a
    byte order mark, a lone surrogate, too deep, or ``Content-Encoding``); ``detail`` starts with
    the sub-code."""
    MCP_INVALID_BODY = "mcp_invalid_body"
    """A body that is not one JSON-RPC 2.0 message (invalid JSON, not JSON-RPC, not application/json)."""
    MCP_BODY_TOO_LARGE = "mcp_body_too_large"
    """The JSON-RPC body is over the cap (``envoy.rpc_body_cap``)."""
    MCP_BODY_UNAVAILABLE = "mcp_body_unavailable"
    """The rule needs the body (no ``Mcp-Method`` header, argument constraints, A2A) and the Envoy
    route sends none: a host Envoy was not rendered to buffer (``envoy.rpc_hosts``)."""
    TOOL_NOT_ALLOWED = "tool_not_allowed"
    """An MCP ``tools/call`` of a tool no ``tools`` entry of the rule names."""
    ARGUMENT_NOT_ALLOWED = "argument_not_allowed"
    """An MCP ``tools/call`` of a listed tool whose ``arguments`` fail the entry's constraints
    (``detail`` names the JSON pointer and operator, never the value)."""
    RESOURCE_NOT_ALLOWED = "resource_not_allowed"
    """An MCP ``resources/read`` of a URI no ``resources`` pattern of the rule names."""
    PROMPT_NOT_ALLOWED = "prompt_not_allowed"
    """An MCP ``prompts/get`` of a prompt the rule's ``prompts`` do not name."""
    RPC_METHOD_NOT_ALLOWED = "rpc_method_not_allowed"
    """A JSON-RPC method (MCP or A2A) the rule's ``rpc_methods`` do not name."""
    DNS_NOT_ALLOWED = "dns_not_allowed"
    """DNS: a name no active rule of the local agent allows (exact or ``*.suffix`` host) and
    ``dns.allow`` does not list, or no host name at all; answered NXDOMAIN (or REFUSED, ``dns.refuse_with``)
    with an Extended DNS Error naming the decision, never forwarded."""
    DESTINATION_MISMATCH = "destination_mismatch"
    """Transparent egress: a ``tls: passthrough`` connection whose original destination is not an
    address of its SNI host - neither its ``envoy.destinations`` pin nor an answer the pod's DNS (the
    sidecar's DNS proxy) gave for that name: an allowed name sent to another address (closed)."""
    REFUSED_BY_PROXY = "refused_by_proxy"
    """Envoy ended a request or connection without a decision, and reported it (gRPC access log): a
    request it could not parse (``detail``: Envoy's response code details, e.g. ``http1.codec_error``),
    ext_authz unreachable or late (``ext_authz_error``), a connection that sent nothing to judge
    within the listener's limits; ``status`` is what Envoy answered (0: the connection was closed).
    Recorded after the fact."""
    HEADERS_TOO_LARGE = "headers_too_large"
    """An allowed call whose headers, with the token and API key the sidecar adds, would exceed what
    Envoy forwards (60 KiB of headers or 100 headers): denied with 431 rather than recorded as an
    allow that Envoy turns into a 500. The budget it was charged is given back."""
    TASK_QUARANTINED = "task_quarantined"
    """The task is frozen - by the anomaly rule (too many out-of-task denials of it, or of a task it was
    delegated from, within the window) or by a signed operator action on the task, a task above it or
    its agent: every call is denied until an operator unfreezes it (``detail`` says which freeze)."""
    SENSITIVITY_NOT_ALLOWED = "sensitivity_not_allowed"
    """A rule allows the call, but its sensitivity label (the rule's, or its host's in
    ``sensitivity.hosts``) is above the task's ``max_sensitivity``."""
    APPROVAL_REQUIRED = "approval_required"
    """The rule says ``approval: required`` for this call and no approval for exactly this call exists
    yet: the deny body and the record carry an ``approval_id`` for an operator to approve
    (``agent-authz approve ID``); the agent then retries the same call once."""
    APPROVAL_MISMATCH = "approval_mismatch"
    """An approval exists for a call of the same shape (agent, task, destination, method, path, tool) but
    other arguments, body or query: it does not cover this call (a new ``approval_id`` is in the body)."""
    APPROVAL_REPLAYED = "approval_replayed"
    """The approval for exactly this call was already used: an approval allows one call (a new
    ``approval_id`` is in the body)."""
    APPROVAL_EXPIRED = "approval_expired"
    """The approval for this call expired before the retry (its ``--ttl``); a new ``approval_id`` is in the body."""
    APPROVAL_POLICY_CHANGED = "approval_policy_changed"
    """The task's declaration (its policy version) changed since the call was put up for approval: the
    approval no longer holds (a new ``approval_id`` is in the body)."""
    APPROVAL_BODY_UNAVAILABLE = "approval_body_unavailable"
    """An approval-gated call carries a body the sidecar did not see in full - its Envoy route buffers
    none (a host only a grant names, not in ``envoy.approval_hosts``; an intercepted one), or the body is
    over ``envoy.rpc_body_cap`` - so no approval could bind it."""
    TASK_FROZEN = "task_frozen"
    """Control record: a task, a delegation subtree or an agent was frozen - by the anomaly rule
    (``action.evidence`` lists the ids of the records that tripped it) or by a signed action."""
    WOULD_QUARANTINE = "would_quarantine"
    """Control record, dry run (``quarantine.dry_run`` or ``dry_run``): the anomaly rule tripped
    (``action.evidence``) and nothing was frozen."""
    TASK_UNFROZEN = "task_unfrozen"
    """Control record: a signed ``unfreeze`` (a root issuer's) lifted the freezes of its target."""
    TASK_KILLED = "task_killed"
    """Control record: a signed ``kill``: the target's tasks and everything delegated below them are
    revoked for good (``task_revoked``), and new grants under them are refused."""
    APPROVAL_GRANTED = "approval_granted"
    """Control record: an operator (a root issuer or an ``approvals.approvers`` SPIFFE ID) approved the
    call of ``approval.id`` for one retry until ``approval.expires_at``."""
    REVOCATION_FEED_STALE = "revocation_feed_stale"
    """The cluster authority's revocation feed has been unreachable for longer than
    ``grants.revocation_feed.max_staleness``: a revocation made elsewhere might not have arrived, so
    tasks from delegated grants (with ``stale_applies_to: all``, every task) are denied until the feed
    is back (503: retry later)."""


_STATUS = {
    Reason.BUDGET_EXHAUSTED: 429,
    Reason.BAD_REQUEST: 400,
    Reason.MISDIRECTED_REQUEST: 421,
    Reason.MCP_HEADER_MISMATCH: 400,
    Reason.MCP_AMBIGUOUS_BODY: 400,
    Reason.MCP_INVALID_BODY: 400,
    Reason.MCP_BODY_TOO_LARGE: 413,
    Reason.HEADERS_TOO_LARGE: 431,
    Reason.REVOCATION_FEED_STALE: 503,
}


def deny_status(reason: Reason) -> int:
    """HTTP status for a deny: 429 for an exhausted budget, 400 for a malformed request or JSON-RPC
    body, 413 for a body over the cap, 421 (RFC 9110 §15.5.20) for a request misdirected into an
    intercepted connection, 431 (RFC 6585 §5) for headers Envoy would not forward, 503 while the
    revocation feed is stale (a transient condition: retry later), else 403."""
    return _STATUS.get(reason, 403)


@dataclass(frozen=True, slots=True)
class Interception:
    """A request Envoy read by terminating the agent's TLS with a pod-CA certificate (``tls: intercept``).

    Attributes:
        host: the server name (SNI) the intercepting filter chain matched.
        port: the port the agent connected to (the original destination port; 443 through ``CONNECT``).
        upstream_verify: how the route's cluster verifies the upstream it re-originates TLS to
            (``dns:<name> ca:<bundle>``), recorded as is.
    """

    host: str
    port: int
    upstream_verify: str = ""

    @property
    def target(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RpcRoute:
    """A request Envoy sent from a route to an MCP or A2A host (``envoy.rpc_hosts``).

    Attributes:
        protocol: ``mcp`` or ``a2a``; a deny on such a route is a JSON-RPC error body.
        body_cap: the route's body cap in bytes when it buffers the body (``with_request_body``;
            Envoy buffers one byte more, so a longer body is seen as longer); ``0`` when it buffers
            none (then an MCP call is judged on its ``Mcp-Method`` / ``Mcp-Name`` headers, if any).
    """

    protocol: str
    body_cap: int = 0


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One HTTP request as seen by Envoy, before normalization.

    Attributes:
        direction: egress (the agent calls out) or ingress (someone calls the agent).
        method: HTTP method as sent, e.g. ``"GET"``.
        scheme: ``"http"`` or ``"https"`` (Envoy's ``:scheme``).
        authority: the ``:authority``/Host value, possibly with a port.
        path: the ``:path`` value; Envoy includes the query string here.
        headers: lower-case header names to values (duplicates arrive comma-joined).
        request_id: Envoy's ``x-request-id``.
        peer_certificate: URL-encoded PEM of the client certificate (ingress mTLS), or ``""``.
        protocol: ``http``, or ``tls``/``tcp`` for a connection-level check (then ``method``,
            ``authority`` and ``path`` are empty).
        sni: the TLS ClientHello's server name (``tls``), ``""`` when absent.
        destination: the address the agent connected to, ``ip:port`` (``[v6]:port``); behind the
            transparent listener this is the original destination (``SO_ORIGINAL_DST``).
        interception: set when the request came through an intercepting filter chain (the route's
            ``intercept`` and ``upstream_verify`` context extensions); ``None`` otherwise.
        upstream_tls: the route opens TLS to the upstream (context extension ``upstream_tls:
            originate``); a ``tls: originate`` rule allows a call only through such a route.
        via_connect: a connection check from inside a proxy ``CONNECT`` tunnel (gRPC metadata
            ``x-agent-authz-via: connect``): there is no original destination.
        connect: on a request inside a proxy ``CONNECT`` tunnel (an intercepting chain of
            ``intercept_connect``), the ``host:port`` the ``CONNECT`` named (Envoy sets
            ``x-agent-authz-connect`` from the tunnel's filter state); ``""`` otherwise.
        rpc: set when the request came through an MCP/A2A route (the route's ``rpc_protocol`` and
            ``rpc_body_cap`` context extensions); ``None`` otherwise.
        body: the request body Envoy buffered (a route with a body cap, ``with_request_body``), or
            ``None`` when the route sends none.
        body_cap: on a plain-HTTP route that buffers the body (an ``approval`` host), its cap in
            bytes (Envoy sends one byte more of a longer body); ``0`` otherwise.
    """

    direction: Direction
    method: str
    scheme: str
    authority: str
    path: str
    headers: Mapping[str, str]
    request_id: str = ""
    peer_certificate: str = ""
    protocol: Protocol = Protocol.HTTP
    sni: str = ""
    destination: str = ""
    interception: Interception | None = None
    upstream_tls: bool = False
    via_connect: bool = False
    connect: str = ""
    rpc: RpcRoute | None = None
    body: bytes | None = None
    body_cap: int = 0


@dataclass(frozen=True, slots=True)
class ProxyRefusal:
    """A request or connection Envoy ended without a decision, from its gRPC access log.

    Attributes:
        direction: the listener's side.
        protocol: ``http`` (an HTTP connection manager's entry) or ``tcp`` (a ``tcp_proxy``'s).
        method / authority: the request's, as Envoy parsed them (``""`` when it could not).
        path: the path without its query string (the ``drop-query`` log policy).
        destination: the connection's local address (the original destination behind ``outbound``).
        sni: the TLS server name, when there was one.
        status: the HTTP status Envoy answered; 0 for a connection it closed.
        detail: Envoy's own explanation (response code details, termination details, response flags).
    """

    direction: Direction
    protocol: Protocol
    method: str
    authority: str
    path: str
    destination: str
    sni: str
    status: int
    detail: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a decision record may say about a minted token: never the token itself."""

    jti: str
    aud: str
    exp: int
    cached: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """The single outcome value of an authorization decision.

    Attributes:
        allow: whether Envoy forwards the request.
        reason: stable reason code.
        http_status: 200 on allow; 403, 429 or 400 on deny.
        decision_id: unique id, returned to Envoy as dynamic metadata and as a header.
        detail: a short human explanation (never secret material).
        task_id / agent / on_behalf_of / rule: what the decision was judged against (``agent`` is
            this sidecar's agent: the caller on egress, the callee on ingress).
        caller: on ingress, the verified caller SPIFFE ID (when identification succeeded).
        peer: on ingress with a JWT-SVID, the mTLS peer's SPIFFE ID (the caller is the JWT-SVID's
            subject; both are recorded, also when they differ and the call is denied).
        txn: the task's transaction id (the root task of a delegation chain).
        act_chain: SPIFFE IDs of the actors on egress, current first (the ``act`` nesting).
        host / port / path / method: the normalized request (path without query).
        headers_to_set: request headers Envoy overwrites (``append_action=OVERWRITE_IF_EXISTS_OR_ADD``).
            May hold a bearer token or an API key: never log this field.
        headers_to_remove: request headers Envoy removes before forwarding.
        token: jti/aud/exp of the token injected, if any.
        dry_run: decided in dry-run mode (the call is let through whatever the policy says).
        would_reason: in dry-run mode, the reason the policy gave (``allowed`` or a deny reason).
        protocol / sni / destination: as in :class:`AuthzRequest` (recorded for connection checks
            and for requests that arrived through the transparent listener).
        tls: ``intercept`` for a request Envoy read by terminating the agent's TLS with a pod-CA
            certificate (``sni`` is then the intercepted name); ``""`` otherwise.
        upstream_verify: with ``tls: intercept``, how Envoy verifies the upstream it re-originates
            to (``dns:<name> ca:<bundle>``); the outcome is in Envoy's access log
            (``upstream_tls_failure``), joined on ``decision_id``.
        connect: a request inside a proxy ``CONNECT`` tunnel: the authority the ``CONNECT`` named.
        qtype: a DNS query's type (``A``, ``AAAA``, ``TXT``...); ``""`` otherwise.
        rpc_protocol: ``mcp`` or ``a2a`` when the request came through an MCP/A2A route (a deny is
            then a JSON-RPC error body), else ``""``.
        rpc: what the record says about the JSON-RPC message (``method``, ``tool`` / ``resource`` /
            ``prompt``, ``decided_from``, ``arguments_digest``, allow-listed ``arguments``).
        rpc_id: the JSON-RPC id of the request, for the error body.
        list_filter: on an allowed MCP ``tools/list``, the tool name patterns the response is
            filtered to (Envoy's ext_proc reads them from dynamic metadata); ``None`` otherwise.
        purpose: the task's ``purpose``.
        sensitivity: the sensitivity label of the destination as judged (the rule's or its host's,
            else ``sensitivity.default``); ``None`` when no rule of the task names the host.
        remaining: calls left under the tightest ``max_calls`` of the rule that decided (after this
            call on an allow; ``0`` on ``budget_exhausted``); ``None`` when no limit applies.
        approval: an approval this decision created, used or refused (``id``, ``status``,
            ``expires_at``, ``approved_by``); ``None`` otherwise.
        action: on a ``control`` record: the action (``kind``, ``target``, ``by``, ``action_id``,
            ``evidence``, ``source``).
        followups: control decisions to record right after this one (a quarantine this call tripped).
    """

    allow: bool
    reason: Reason
    http_status: int
    decision_id: str
    detail: str = ""
    direction: Direction = Direction.EGRESS
    task_id: str | None = None
    agent: str | None = None
    caller: str | None = None
    peer: str | None = None
    on_behalf_of: str | None = None
    txn: str | None = None
    act_chain: tuple[str, ...] = ()
    rule: str | None = None
    method: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    token: TokenInfo | None = None
    dry_run: bool = False
    would_reason: Reason | None = None
    protocol: Protocol = Protocol.HTTP
    sni: str = ""
    destination: str = ""
    tls: str = ""
    upstream_verify: str = ""
    connect: str = ""
    qtype: str = ""
    rpc_protocol: str = ""
    rpc: Mapping[str, object] | None = None
    rpc_id: str | int | None = None
    list_filter: tuple[str, ...] | None = None
    purpose: str | None = None
    sensitivity: str | None = None
    remaining: int | None = None
    approval: Mapping[str, object] | None = None
    action: Mapping[str, object] | None = None
    followups: tuple[Decision, ...] = ()
