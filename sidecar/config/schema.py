"""The schema of ``sidecar.yaml``, as pydantic models.

Every model is frozen and forbids unknown keys, so a typo is an error, not a silently ignored
setting. Each field's docstring is its description (``use_attribute_docstrings``): the reference
page ``docs/reference/config.md`` is generated from these models by ``scripts/gen_docs.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from sidecar.agentproto.spec import AgentProtocolSpec, ArgumentConstraintSpec, Pointer
from sidecar.config.durations import parse_duration
from sidecar.decision import Reason
from sidecar.errors import BadRequestError, SpiffeIdError
from sidecar.http_norm import normalize_path
from sidecar.identity.spiffe_id import parse_spiffe_id
from sidecar.wire import HTTP_METADATA_KEYS

__all__ = [
    "CONTROL_DIR",
    "QUARANTINE_REASONS",
    "SENSITIVITY_LEVELS",
    "ApprovalSpec",
    "ApprovalsSpec",
    "CallerSpec",
    "CredentialSpec",
    "DecisionLogSpec",
    "DnsSpec",
    "EgressRuleSpec",
    "EnvoySpec",
    "GrantsSpec",
    "IdentityFilesSpec",
    "IdentitySpec",
    "IngressRuleSpec",
    "IngressSpec",
    "InterceptSpec",
    "IssuerSpec",
    "LadderSpec",
    "ListenSpec",
    "QuarantineRuleSpec",
    "QuarantineSpec",
    "RevocationFeedSpec",
    "RootIssuerSpec",
    "RotateSpec",
    "Sensitivity",
    "SensitivitySpec",
    "SidecarConfig",
    "SpiffeIdStr",
    "StateSpec",
    "TaskFileSpec",
    "TaskSpec",
    "WorkloadApiSpec",
    "default_port",
    "intercept_host_problem",
    "tls_rule_conflicts",
]

Seconds = Annotated[float, BeforeValidator(parse_duration)]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2 token
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HOST = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
"""Upstream CA bundle for ``tls: originate`` when ``envoy.upstream_ca`` is not set (Debian/Ubuntu path)."""
_NO_HTTP_MATCH = ("methods", "paths", "audience", "scope", "credential", "approval")
_TLS_PORT_MODES = ("passthrough", "intercept")
_FORBIDDEN_CREDENTIAL_HEADERS = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "te", "upgrade", "x-agent-task"}
    | set(HTTP_METADATA_KEYS)  # an HTTP check's answer carries the dynamic metadata under these names
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False, use_attribute_docstrings=True)


def _spiffe_id(value: str) -> str:
    try:
        parse_spiffe_id(value)
    except SpiffeIdError as exc:
        raise ValueError(str(exc)) from None
    return value


SpiffeIdStr = Annotated[str, BeforeValidator(_spiffe_id)]
"""A string validated as a strict workload SPIFFE ID (SPIFFE-ID §2)."""


class CredentialSpec(_Model):
    """A static API key the sidecar injects so the agent never holds it.

    ``file`` is read at load and on every reload; its content prefixed with ``prefix`` is set in
    ``header``, overwriting any agent-supplied value.
    """

    header: str
    """HTTP header the key is set in (lower-cased; not ``host``, ``connection``, ``content-length``,
    ``transfer-encoding``, ``te``, ``upgrade``, ``x-agent-task``, ``x-agent-authz-*``, ``x-envoy-*``
    nor a dynamic metadata key: ``decision_id``, ``decision``, ``reason``, ``task_id``,
    ``mcp_list_filter``)."""
    file: Path
    """File holding the key: one line of printable ASCII (surrounding whitespace is dropped)."""
    prefix: str = ""
    """Text put before the key, e.g. ``Bearer `` or ``Token ``."""

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _TOKEN.match(value) or value.startswith(":"):
            raise ValueError("not a valid HTTP header name")
        lowered = value.lower()
        if lowered in _FORBIDDEN_CREDENTIAL_HEADERS or lowered.startswith(("x-agent-authz-", "x-envoy-")):
            raise ValueError(f"header {value!r} cannot carry a credential")
        return lowered


def _credential_kind(value: object) -> str:
    return "by_name" if isinstance(value, str) else "inline"


CredentialRef = Annotated[
    Annotated[CredentialSpec, Tag("inline")] | Annotated[str, Tag("by_name")], Discriminator(_credential_kind)
]
"""A rule's credential: inline ``{header, file, prefix}``, or the name of an entry in ``credentials``."""
UNION_TAGS = frozenset({"inline", "by_name"})


class _HttpMatchSpec(_Model):
    """Methods and paths a rule matches.

    Paths are compared after normalization (decoded once, dot segments removed, slashes merged);
    the query string is never part of the match.
    """

    methods: list[str] = Field(min_length=1)
    """HTTP methods (upper-cased), or ``["*"]`` for any."""
    paths: list[str] = Field(min_length=1)
    """Path patterns: ``/exact/path``; ``/prefix/*`` = every path below ``/prefix/`` (not ``/prefix``
    itself, nor ``/prefixes``); ``*`` = any path. Patterns must be in canonical form (a pattern such
    as ``/v1/../x`` is an error naming the canonical ``/x``); the query string never takes part."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return _http_methods(value)

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if pattern == "*":
                continue
            base = pattern[:-1] if pattern.endswith("/*") else pattern
            if "*" in base:
                raise ValueError(f"{pattern!r}: '*' is allowed only as the whole pattern or as a final '/*'")
            try:
                canonical, query = normalize_path(base)
            except BadRequestError as exc:
                raise ValueError(f"{pattern!r}: {exc}") from None
            if query or canonical != base:
                raise ValueError(f"{pattern!r} is not in canonical form (expected {canonical!r})")
        return value


SENSITIVITY_LEVELS = ("public", "internal", "confidential", "restricted")
"""Sensitivity labels, least sensitive first: a task's ``max_sensitivity`` admits its own level and
those before it."""
Sensitivity = Literal["public", "internal", "confidential", "restricted"]
"""One of :data:`SENSITIVITY_LEVELS`."""

QUARANTINE_REASONS = (
    Reason.HOST_NOT_ALLOWED,
    Reason.PORT_NOT_ALLOWED,
    Reason.METHOD_NOT_ALLOWED,
    Reason.PATH_NOT_ALLOWED,
    Reason.TOOL_NOT_ALLOWED,
    Reason.ARGUMENT_NOT_ALLOWED,
    Reason.RESOURCE_NOT_ALLOWED,
    Reason.PROMPT_NOT_ALLOWED,
    Reason.RPC_METHOD_NOT_ALLOWED,
    Reason.SENSITIVITY_NOT_ALLOWED,
    Reason.DNS_NOT_ALLOWED,
    Reason.DESTINATION_MISMATCH,
)
"""The out-of-task kinds the anomaly rule counts by default: a call the task's rules do not allow."""
_COUNTABLE = (
    *QUARANTINE_REASONS,
    Reason.TLS_NOT_ALLOWED,
    Reason.TCP_NOT_ALLOWED,
    Reason.APPROVAL_MISMATCH,
    Reason.APPROVAL_REPLAYED,
)
"""What ``quarantine.reasons`` may name: never a budget, an expiry, a revocation or a freeze (those say
nothing about the agent trying things outside its task)."""


def _http_methods(value: list[str]) -> list[str]:
    out = []
    for method in value:
        if method != "*" and not _TOKEN.match(method):
            raise ValueError(f"{method!r} is not an HTTP method")
        out.append(method.upper())
    return out


class ApprovalSpec(_Model):
    """Which calls of a rule wait for a human: those matching every condition given (a condition left
    out matches every call). ``approval: required`` is the rule's every call."""

    methods: list[str] | None = Field(default=None, min_length=1)
    """Only calls with one of these HTTP methods."""
    tools: list[str] | None = Field(default=None, min_length=1)
    """MCP: only ``tools/call`` of these tool names (or ``*`` globs)."""
    arguments: dict[Pointer, ArgumentConstraintSpec] | None = Field(default=None, min_length=1)
    """MCP: only ``tools/call`` whose ``params.arguments`` satisfy every one of these constraints
    (JSON pointer -> one operator, as in ``tools[].arguments``)."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _http_methods(value)

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not re.match(r"^[\x21-\x7e]{1,128}$", name):
                raise ValueError(f"{name!r} is not a tool name or glob")
        return value


ApprovalRef = Literal["required"] | ApprovalSpec
"""``required`` (every call of the rule), or :class:`ApprovalSpec` conditions."""

_RPC_METHODS = {"mcp": ["POST", "GET", "DELETE"], "a2a": ["POST", "GET"]}
"""HTTP methods of an MCP/A2A rule that names none: JSON-RPC over POST; GET for the 2025-11-25
server stream and the A2A agent card; DELETE to end an MCP session."""


class EgressRuleSpec(_HttpMatchSpec, AgentProtocolSpec):
    """One outbound call pattern a task allows: host, port, methods, paths, and what to inject.

    ``protocol: mcp`` / ``protocol: a2a`` (:class:`~sidecar.agentproto.spec.AgentProtocolSpec`):
    the rule also judges the JSON-RPC message in each POST body - ``tools``, ``resources``,
    ``prompts``, ``rpc_methods``; ``methods`` then default to ``POST, GET, DELETE`` (MCP) or
    ``POST, GET`` (A2A).

    ``tls`` says what the agent sends and how Envoy reaches the upstream:

    * ``none`` (default): plain HTTP to ``host:port`` (port default 80).
    * ``passthrough``: a TLS connection the agent opens itself to ``host:port`` (port default 443),
      judged on the SNI and the original destination; Envoy sees no HTTP, so the rule has no
      ``methods``, ``paths``, ``audience``, ``scope``, ``credential`` and injects no token.
      ``max_calls`` counts connections.
    * ``originate``: the agent calls ``http://host`` (port default 80) and Envoy opens TLS to
      ``host:upstream_port`` (default 443) with SNI ``host``, verifying the upstream certificate;
      the token is injected and travels encrypted. ``host`` must be exact (Envoy needs the name to
      verify the certificate), and all ``originate`` rules for one host agree on ``upstream_port``.
    * ``intercept``: the agent calls ``https://host`` (port default 443) itself; Envoy terminates
      its TLS with a certificate for ``host`` from the per-pod CA (``intercept`` section), judges
      every request inside (methods, paths, token, credential as for plain HTTP) and opens a new,
      verified TLS connection to ``host:upstream_port`` (default: ``port``). ``host`` must be an
      exact DNS name - no ``*.`` wildcard and no IP address - since the pod CA certifies exactly that
      name (RFC 6125 §6.4.1 reference identifiers).
    """

    @model_validator(mode="before")
    @classmethod
    def _passthrough_sees_no_http(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tls") == "passthrough":
            given = [key for key in _NO_HTTP_MATCH if key in data]
            if data.get("token", False) is not False:
                given.append("token")
            if given:
                raise ValueError(f"'tls: passthrough' sees no HTTP request: remove {', '.join(given)}")
            data = {**data, "methods": ["*"], "paths": ["*"], "token": False}
        if isinstance(data, dict) and data.get("protocol") in _RPC_METHODS and "methods" not in data:
            data = {**data, "methods": _RPC_METHODS[data["protocol"]]}
        return data

    name: str | None = Field(default=None, max_length=128)
    """Names the rule in decisions and records, and keys its budget across reloads."""
    host: str
    """Exact DNS name, or ``*.suffix`` (any name ending in ``.suffix``, not ``suffix`` itself);
    lower-cased, one trailing dot dropped."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """The port the agent connects to; default 80 (plain HTTP and ``originate``) or 443
    (``passthrough``, ``intercept``)."""
    audience: str | None = None
    """``aud`` of the token; default ``http://host`` (``http://host:port`` on a non-default port), with
    the host the agent actually named; ``https://host[:upstream_port]`` with ``tls: originate`` and
    ``https://host[:port]`` with ``tls: intercept``."""
    scope: str | None = None
    """``scope`` of the token: space-separated scope tokens (RFC 6749 §3.3)."""
    max_calls: int | None = Field(default=None, ge=0)
    """Budget of this rule (calls; connections with ``tls: passthrough``); over it: 429
    ``budget_exhausted``. None: unlimited."""
    token: bool = True
    """``true``: inject a task-scoped token in ``Authorization``; ``false``: none (e.g. a third-party
    API)."""
    credential: CredentialRef | None = None
    """An API key to inject: inline ``{header, file, prefix}`` (the file's content, prefixed with
    ``prefix``, is set in ``header``, overwriting any agent value) or the name of an entry in
    ``credentials``. Putting it in ``authorization`` needs ``token: false``."""
    tls: Literal["none", "passthrough", "originate", "intercept"] = "none"
    """What the agent sends and how Envoy reaches the upstream (the modes above). A host and port is
    either ``passthrough`` or ``intercept`` across all tasks, grants and task files (a conflict is a
    config error, and a reload bringing one is refused)."""
    upstream_port: int | None = Field(default=None, ge=1, le=65535)
    """With ``tls: originate``: the upstream's TLS port (default 443; the same for every ``originate``
    rule of one host). With ``tls: intercept``: the port Envoy re-originates to (default: ``port``; the
    same for every ``intercept`` rule of one host and port). The upstream address is
    ``envoy.destinations[host]``'s address with this port, else DNS."""
    sensitivity: Sensitivity | None = None
    """How sensitive what this rule reaches is (``public``, ``internal``, ``confidential``,
    ``restricted``); the higher of this and the host's label (``sensitivity.hosts``) is compared with
    the task's ``max_sensitivity``, recorded, and carried in the minted token's ``sensitivity`` claim.
    None: the host's label, else ``sensitivity.default``. A delegated rule can raise it, never lower it."""
    approval: ApprovalRef | None = None
    """``required``: each call this rule allows first waits for a human approval bound to exactly that
    call (403 ``approval_required`` with an ``approval_id``; ``agent-authz approve ID``; the retry is
    allowed once). Or conditions (``methods``, ``tools``, ``arguments``) naming the calls that wait.
    Not with ``tls: passthrough`` (no request to bind). A delegated rule keeps its parent's."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        host = value.lower()
        if host.endswith("."):
            host = host[:-1]
        if not _HOST.match(host) or len(host) > 253:
            raise ValueError("must be a DNS name or '*.' followed by a DNS suffix, e.g. '*.example.com'")
        return host

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in '"\\') or "  " in value):
            raise ValueError("scope is a space-separated list of scope tokens (RFC 6749 §3.3)")
        return value

    @field_validator("credential")
    @classmethod
    def _credential_name(cls, value: CredentialSpec | str | None) -> CredentialSpec | str | None:
        if isinstance(value, str) and not _NAME.match(value):
            raise ValueError("a credential name: 1-64 characters of a-z 0-9 . _ -")
        return value

    @model_validator(mode="after")
    def _token_vs_credential(self) -> EgressRuleSpec:
        if self.token and isinstance(self.credential, CredentialSpec) and self.credential.header == "authorization":
            raise ValueError("credential.header 'authorization' needs 'token: false' (the token goes there)")
        if self.upstream_port is not None and self.tls not in ("originate", "intercept"):
            raise ValueError("'upstream_port' needs 'tls: originate' or 'tls: intercept'")
        if self.tls == "originate" and self.host.startswith("*."):
            raise ValueError("'tls: originate' needs an exact host: Envoy verifies the upstream certificate by name")
        if self.tls == "intercept":
            problem = intercept_host_problem(self.host)
            if problem is not None:
                raise ValueError(f"'tls: intercept' needs an exact DNS name: {problem}")
        if self.protocol != "http" and self.tls in ("passthrough", "intercept"):
            raise ValueError(f"'protocol: {self.protocol}' is judged on plain HTTP or 'tls: originate' routes")
        conditional = isinstance(self.approval, ApprovalSpec)
        if conditional and self.protocol != "mcp" and (self.approval.tools or self.approval.arguments):  # type: ignore[union-attr]
            raise ValueError("approval.tools and approval.arguments need 'protocol: mcp'")
        return self

    @property
    def agent_port(self) -> int:
        """The port the agent connects to: ``port``, else the default of the rule's ``tls`` mode."""
        return self.port or default_port(self.tls)

    @property
    def intercept_upstream_port(self) -> int:
        """With ``tls: intercept``: the upstream's TLS port (``upstream_port``, else :attr:`agent_port`)."""
        return self.upstream_port or self.agent_port


def default_port(tls: str) -> int:
    """The default agent-facing port of a rule: 443 for ``passthrough``/``intercept`` (TLS the agent
    starts itself), else 80 (plain HTTP, also for ``originate``)."""
    return 443 if tls in _TLS_PORT_MODES else 80


def intercept_host_problem(host: str) -> str | None:
    """Why ``host`` (canonical form) cannot have a pod-CA certificate, or ``None`` if it can.

    Refused: a ``*.`` wildcard (the CA certifies exact names only), an IP address literal or a
    name whose last label is all digits (RFC 1123 §2.1, RFC 3696 §2: such a name is read as an
    address; RFC 6066 §3 forbids addresses in SNI).
    """
    if host.startswith("*."):
        return f"{host!r} is a wildcard; name each host"
    if host.rsplit(".", 1)[-1].isdigit():
        return f"{host!r} is an IP address, not a DNS name"
    return None


def tls_rule_conflicts(rules: Iterable[tuple[str, EgressRuleSpec]]) -> str | None:
    """Check rules (``(where, rule)`` pairs, from every task) that share a TLS listener match.

    A TLS connection to ``host:port`` is either passed through (judged on SNI) or intercepted
    (terminated with a pod-CA certificate): Envoy picks one filter chain per server name and port.
    And all ``intercept`` rules for one ``host:port`` name the same ``upstream_port``.

    Returns:
        A message naming both rules, or ``None`` when they agree.
    """
    seen: dict[tuple[str, int], tuple[str, str, int | None]] = {}
    for where, rule in rules:
        if rule.tls not in _TLS_PORT_MODES:
            continue
        key = (rule.host, rule.agent_port)
        upstream = rule.intercept_upstream_port if rule.tls == "intercept" else None
        first = seen.setdefault(key, (where, rule.tls, upstream))
        if first[1] != rule.tls:
            return (
                f"{where}: 'tls: {rule.tls}' for {rule.host}:{key[1]}, but {first[0]} says 'tls: {first[1]}' "
                "(a TLS connection is either passed through or intercepted)"
            )
        if first[2] != upstream:
            return (
                f"{where}: 'tls: intercept' for {rule.host}:{key[1]} with upstream_port {upstream}, "
                f"but {first[0]} says {first[2]} (one upstream per host and port)"
            )
    return None


class QuarantineRuleSpec(_Model):
    """An anomaly rule: ``threshold`` out-of-task denials within ``window`` freeze the task."""

    threshold: int = Field(ge=1, le=10_000)
    """Denials of the counted kinds (``quarantine.reasons``) that freeze the task."""
    window: Seconds = 60.0
    """Within this many seconds (10 ms - 1 day)."""

    @field_validator("window")
    @classmethod
    def _window(cls, value: float) -> float:
        if not 0.01 <= value <= 86400:
            raise ValueError("window must be between 10ms and 1d")
        return value


class TaskSpec(_Model):
    """A declared task: who works, for whom, why, until when, and which calls it may make.

    Validity starts at ``not_before`` (default: at once) and ends at ``expires_at`` or after ``ttl``
    (exactly one of the two).
    """

    id: str
    """1-256 characters of ``A-Za-z0-9._:/-``, starting with a letter or digit; unique (delegated
    tasks are ``<parent id>/<name>``)."""
    agent: SpiffeIdStr
    """SPIFFE ID of the agent the task belongs to."""
    on_behalf_of: str | None = Field(default=None, min_length=1, max_length=512)
    """The user or principal served; becomes the token's ``sub`` (else the agent's SPIFFE ID)."""
    purpose: str = Field(min_length=1, max_length=1024)
    """Free text: why the task exists."""
    not_before: AwareDatetime | None = None
    """Start of validity (an RFC 3339 time with offset); before it: ``task_not_yet_valid``."""
    expires_at: AwareDatetime | None = None
    """End of validity (an RFC 3339 time with offset); exactly one of ``expires_at`` and ``ttl``."""
    ttl: Seconds | None = None
    """Lifetime counted from ``not_before`` or, without it, from the first time this sidecar loaded the
    task (a reload never extends it); exactly one of ``expires_at`` and ``ttl``."""
    max_calls: int | None = Field(default=None, ge=0)
    """Budget over all rules of the task; over it: 429 ``budget_exhausted``."""
    revoked: bool = False
    """``true`` denies every call of the task from the next request on (``task_revoked``)."""
    max_sensitivity: Sensitivity | None = None
    """The most sensitive label the task may touch; a call whose rule or host is labelled higher is
    denied ``sensitivity_not_allowed``. None: any. A delegated task's is at most its parent's."""
    quarantine: QuarantineRuleSpec | None = None
    """This task's anomaly rule (and, carried in its grants, its delegation subtree's); the stricter of
    it and the sidecar's ``quarantine`` applies. A delegated task's is at least as strict as its parent's."""
    egress: list[EgressRuleSpec] = Field(default_factory=list)
    """The calls the task allows."""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _TASK_ID.match(value):
            raise ValueError("task id: 1-256 characters of A-Z a-z 0-9 . _ : / - starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _validity(self) -> TaskSpec:
        if (self.expires_at is None) == (self.ttl is None):
            raise ValueError("set exactly one of 'expires_at' or 'ttl'")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("ttl must be positive")
        if self.expires_at is not None and self.not_before is not None and self.expires_at <= self.not_before:
            raise ValueError("expires_at must be after not_before")
        names = [rule.name for rule in self.egress if rule.name]
        if len(names) != len(set(names)):
            raise ValueError("egress rule names must be unique within a task")
        return self


class WorkloadApiSpec(_Model):
    """The SPIFFE Workload API (a SPIRE agent socket): the sidecar streams ``FetchX509SVID`` (and
    ``FetchJWTBundles``) itself, validates every update like a peer's SVID (an invalid one is refused
    and the previous identity stays), reconnects with backoff and swaps valid ones in atomically;
    Envoy reads the SPIRE agent's SDS on the same socket."""

    socket: str = "unix:///run/spire/sockets/agent.sock"
    """The Workload API socket (``unix:///absolute/path``); Envoy reads SPIRE's SDS on the same socket."""
    timeout: Seconds = 10.0
    """How long to wait for the first SVID at start (an invalid first SVID refuses to start at once)."""
    svid_secret: str = "default"  # noqa: S105 - SPIRE's SDS resource names
    """SPIRE SDS resource name of the agent's SVID, rendered for Envoy."""
    bundle_secret: str = "ALL"  # noqa: S105
    """SPIRE SDS resource name of the trust bundles, rendered for Envoy."""

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: str) -> str:
        if not value.startswith("unix:///") or len(value) > 7 + 107:
            raise ValueError("expected unix:///absolute/path (at most 107 bytes of path)")
        return value


class IdentityFilesSpec(_Model):
    """An X.509-SVID and trust bundles from PEM files, watched like the config (a rotated file is
    picked up without restart). Envoy gets them through file-based SDS that ``envoy-config`` writes
    beside the bootstrap (or into ``envoy.sds_dir``)."""

    svid: Path
    """PEM chain of the agent's X.509-SVID, leaf first."""
    key: Path
    """PEM private key of the SVID."""
    bundles: dict[str, Path] = Field(min_length=1)
    """Trust domain → PEM file of its X.509 authorities (one entry per federated trust domain)."""
    jwt_bundles: dict[str, Path] = Field(default_factory=dict)
    """Trust domain → SPIFFE bundle or plain JWKS file of its JWT-SVID signers (keys whose ``use`` is
    ``jwt-svid`` or absent; keys of another ``use`` are ignored and logged once)."""

    @field_validator("bundles", "jwt_bundles")
    @classmethod
    def _trust_domains(cls, value: dict[str, Path]) -> dict[str, Path]:
        for trust_domain in value:
            try:
                parse_spiffe_id(f"spiffe://{trust_domain}", require_path=False)
            except SpiffeIdError as exc:
                raise ValueError(f"{trust_domain!r} is not a trust domain name ({exc})") from None
        return value


class IdentitySpec(_Model):
    """Where this agent's identity and the trust bundles come from.

    Trust bundles are kept per trust domain (federation): a peer is always verified against the
    bundle of the trust domain named in its SPIFFE ID, never a pooled store.
    """

    source: Literal["workload_api", "files"]
    """``workload_api``: the SPIFFE Workload API (SPIRE), updates streamed and swapped atomically;
    ``files``: PEM files, watched like the config."""
    workload_api: WorkloadApiSpec = WorkloadApiSpec()
    """The Workload API, with ``source: workload_api``."""
    files: IdentityFilesSpec | None = None
    """The PEM files, required with ``source: files``."""

    @model_validator(mode="after")
    def _files_present(self) -> IdentitySpec:
        if self.source == "files" and self.files is None:
            raise ValueError("source 'files' needs a 'files' section")
        return self


class CallerSpec(_Model):
    """Who may call: an exact SPIFFE ``id``, or a ``trust_domain`` with an optional ``path_prefix``.

    ``path_prefix`` is segment-aware: ``/ns/finance`` matches ``/ns/finance`` and ``/ns/finance/...``,
    not ``/ns/financeX``.
    """

    id: SpiffeIdStr | None = None
    """An exact SPIFFE ID (exactly one of ``id`` and ``trust_domain``)."""
    trust_domain: str | None = None
    """Any workload of this trust domain (exactly one of ``id`` and ``trust_domain``)."""
    path_prefix: str | None = None
    """With ``trust_domain``: only IDs whose path is this or below it (segment-aware)."""

    @model_validator(mode="after")
    def _one_form(self) -> CallerSpec:
        if (self.id is None) == (self.trust_domain is None):
            raise ValueError("set exactly one of 'id' or 'trust_domain'")
        if self.path_prefix is not None and self.trust_domain is None:
            raise ValueError("'path_prefix' needs 'trust_domain'")
        if self.trust_domain is not None:
            probe = f"spiffe://{self.trust_domain}{(self.path_prefix or '').rstrip('/')}"
            try:
                parse_spiffe_id(probe, require_path=False)
            except SpiffeIdError as exc:
                raise ValueError(f"invalid trust_domain/path_prefix ({exc})") from None
            if self.path_prefix is not None and not self.path_prefix.startswith("/"):
                raise ValueError("path_prefix must start with '/'")
        return self


class IngressRuleSpec(_HttpMatchSpec):
    """Which callers may call which methods and paths on the agent."""

    name: str | None = Field(default=None, max_length=128)
    """Names the rule in decisions and records."""
    callers: list[CallerSpec] = Field(min_length=1)
    """Who the rule admits."""
    forwarders: list[CallerSpec] = Field(default_factory=list)
    """mTLS peers that may present another workload's JWT-SVID under this rule (a gateway forwarding its
    caller's identity); the caller is then the JWT-SVID's subject and both are recorded. Empty: a
    JWT-SVID must name the mTLS peer itself (else ``untrusted_identity``, ``jwt_svid_peer_mismatch``)."""


class IngressSpec(_Model):
    """Inbound policy: default deny; each rule names callers, methods and paths.

    The caller is the mTLS peer's X.509-SVID, or a JWT-SVID it presents (verified against the JWT
    bundle of its trust domain, ``aud`` one of ``audiences``). An allowed request reaches the agent
    with ``x-agent-authz-caller: <SPIFFE ID>``.
    """

    jwt_svid: bool = True
    """Accept a JWT-SVID in ``Authorization: Bearer …`` as the caller's identity."""
    audiences: list[str] = Field(default_factory=list)
    """Accepted JWT-SVID ``aud`` values; empty: the agent's SPIFFE ID."""
    jwt_svid_leeway: Seconds = 30.0
    """Clock skew accepted on a JWT-SVID's ``exp``, ``nbf`` and ``iat`` (0 - 5m; JWT-SVID §3)."""
    jwt_svid_max_lifetime: Seconds = 3600.0
    """Longest accepted JWT-SVID lifetime, ``exp`` - ``iat`` (from ``nbf``, else from now, without
    ``iat``; 1m - 24h): a longer-lived token is refused with ``jwt_svid_lifetime_too_long``."""

    @field_validator("jwt_svid_leeway")
    @classmethod
    def _leeway(cls, value: float) -> float:
        if not 0 <= value <= 300:
            raise ValueError("jwt_svid_leeway must be between 0s and 5m")
        return value

    @field_validator("jwt_svid_max_lifetime")
    @classmethod
    def _max_lifetime(cls, value: float) -> float:
        if not 60 <= value <= 86400:
            raise ValueError("jwt_svid_max_lifetime must be between 1m and 24h")
        return value

    rules: list[IngressRuleSpec] = Field(default_factory=list)
    """Who may call which methods and paths on the agent (default deny)."""


class RootIssuerSpec(_Model):
    """Who may sign root task grants: a key set (``jwks`` file, keys chosen by ``kid``) or a workload
    (``spiffe_id``) signing with its X.509-SVID (``x5c``, verified against its trust domain's bundle)."""

    jwks: Path | None = None
    """A JWKS file of root issuer keys (``agent-authz task keygen``); exactly one of ``jwks`` and
    ``spiffe_id``."""
    spiffe_id: SpiffeIdStr | None = None
    """A workload allowed to sign root grants with its X.509-SVID."""

    @model_validator(mode="after")
    def _one_form(self) -> RootIssuerSpec:
        if (self.jwks is None) == (self.spiffe_id is None):
            raise ValueError("set exactly one of 'jwks' or 'spiffe_id'")
        return self


class TaskFileSpec(_Model):
    """A task declared in a file of its own - in Kubernetes, a pod annotation mounted through a
    downward-API volume, so that changing the annotation reaches the sidecar without a restart.
    A grant in ``path`` is verified like ``grants.files``; a task in YAML/JSON has the shape of a
    ``tasks[]`` entry.
    """

    path: Path
    """A signed grant (compact JWS) or one task in YAML/JSON (``agent`` defaults to this agent;
    credentials by name only); a missing or empty file declares nothing."""
    revoked: Path | None = None
    """A file whose content ``true`` revokes the task."""


class RevocationFeedSpec(_Model):
    """The cluster authority's revocation feed (``agent-authz authority``): a long-lived Server-Sent
    Events stream over mTLS with this agent's X.509-SVID. Entries it brings apply before the next
    request; once the feed has been unreachable for ``max_staleness``, delegated grants (or every
    task) are denied ``revocation_feed_stale`` until it is back. The sidecar also forwards its own
    revocations (``POST /v1/tasks/{id}/revoke``) and announces its public signing keys to the
    authority, which publishes them in the namespace's JWKS. Needs an identity source; changes take
    effect at restart."""

    url: str
    """``https://host:port`` of the authority's feed listener (the chart: its Service, port 8444)."""
    ca: Path
    """PEM CA bundle that verifies the authority's serving certificate."""
    max_staleness: Seconds = 30.0
    """How long the feed may be unreachable (no event, not even a heartbeat) before tasks are denied
    ``revocation_feed_stale`` (fail closed); counted from start until the first connection."""
    stale_applies_to: Literal["delegated", "all"] = "delegated"
    """``delegated``: only tasks from delegated grants (depth 1 or more) are denied while stale;
    ``all``: every task, ``sidecar.yaml`` tasks and root grants included."""
    announce_keys: bool = True
    """Announce the public signing keys (current, next, retired) to the authority, each current and
    next key with a proof of possession, on every connection and every ``announce_interval``."""
    announce_interval: Seconds = 300.0
    """Seconds between key announcements (below the authority's ``keys.announce_ttl``)."""
    reconnect_min: Seconds = 0.1
    """First delay before reconnecting; doubles (with jitter) up to ``reconnect_max``."""
    reconnect_max: Seconds = 5.0
    """Longest delay between reconnection attempts."""
    connect_timeout: Seconds = 5.0
    """Timeout to connect and to get the stream's first event."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https://[^\s/?#]+(:[0-9]{1,5})?/?$", value):
            raise ValueError("expected https://host[:port]")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _bounds(self) -> RevocationFeedSpec:
        if not 1 <= self.max_staleness <= 86400:
            raise ValueError("max_staleness must be between 1s and 24h")
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_min must be positive and at most reconnect_max")
        if self.announce_interval < 1:
            raise ValueError("announce_interval must be at least 1s")
        return self


class GrantsSpec(_Model):
    """Signed task grants (``agent-task+jwt``) this sidecar accepts, delegation limits and revocation
    lists. A Kubernetes annotation mounted through the downward API works as a grant file; an invalid
    revocation list keeps the last good configuration."""

    files: list[Path] = Field(default_factory=list)
    """Grant files (compact JWS) to enforce; watched."""
    root_issuers: list[RootIssuerSpec] = Field(default_factory=list)
    """Who may sign root grants."""
    max_depth: int = Field(default=3, ge=0, le=16)
    """Longest delegation chain accepted or issued (a root grant has depth 0)."""
    revocations: list[Path] = Field(default_factory=list)
    """Signed revocation-list files to honour; watched (a list that does not exist yet counts as empty)."""
    publish_revocations: Path | None = None
    """Where ``POST /v1/tasks/{id}/revoke`` writes this sidecar's signed revocation list."""
    revocation_feed: RevocationFeedSpec | None = None
    """The cluster authority's revocation feed; none: revocations reach this sidecar through
    ``revocations`` files only."""


class IssuerSpec(_Model):
    """The token issuer: who signs task-scoped access tokens (RFC 9068) and with which key."""

    url: str = Field(min_length=1)
    """``iss`` of minted tokens."""
    signing_key: Path
    """PEM private key (EC P-256 for ``ES256``, Ed25519 for ``EdDSA``), loaded once per reload."""
    next_signing_key: Path | None = None
    """Published in the JWKS ahead of rotation, so verifiers know it before it signs."""
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    """JWS algorithm of the tokens."""
    max_token_ttl: Seconds = 300.0
    """Upper bound of a token's lifetime (1 s - 24 h); a retired key stays in the JWKS this long."""
    refresh_ahead: float = Field(default=0.25, gt=0, lt=1)
    """A cached token is re-minted (in the background) when this fraction of its life is left."""
    mint_per_call: bool = False
    """Mint a fresh token, with a new ``jti``, for every call."""
    max_token_size: ByteSize = ByteSize(8 * 1024)
    """Longest token a rule may mint (1 KiB - 32 KiB; many servers refuse a header line over 8 KiB, Envoy
    forwards at most 60 KiB of headers): a task whose claims (``on_behalf_of``, ``scope``, ``audience``,
    a grant's ``act`` chain) could make a longer token is a config error naming the field."""
    bind_to_svid: bool = False
    """Add ``cnf: {"x5t#S256": <SVID thumbprint>}`` to tokens (RFC 8705 §3.1); re-minted on SVID rotation."""

    @field_validator("max_token_size")
    @classmethod
    def _token_size(cls, value: ByteSize) -> ByteSize:
        if not 1024 <= value <= 32 * 1024:
            raise ValueError("max_token_size must be between 1 KiB and 32 KiB")
        return value

    @field_validator("max_token_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("max_token_ttl must be between 1s and 24h")
        return value


CONTROL_DIR = Path("/run/agent-authz/ctl")
"""The default directory of the control sockets (the authz server's, Envoy's admin): created ``0700`` by
the proxy user (:mod:`sidecar.control_socket`); in the Helm chart, inside the ``run`` emptyDir."""


class ListenSpec(_Model):
    """Where the sidecar listens. The admin server's task API answers loopback (and Unix-socket)
    clients only; kubelet probes cannot reach ``127.0.0.1``, hence the separate ``health`` server."""

    authz: str = f"unix:{CONTROL_DIR}/authz.sock"
    """The ext_authz gRPC service, also serving SDS: ``unix:/absolute/path`` (the socket is made ``0600``
    in a directory only the proxy user may write, created ``0700`` when missing) or ``host:port``. On
    TCP every process of the pod, the agent included, can send its own ``Check`` (and read the injected
    keys and tokens in the answer) or stream SDS: ``serve`` warns at start, and the webhook refuses it."""
    authz_http: str | None = None
    """The ext_authz HTTP service, for Envoy's HTTP ext_authz transport (``envoy.authz_transport:
    http``): ``unix:/absolute/path`` (made ``0600``, in a directory only the proxy user may write, as
    for ``authz``) or ``host:port``. Default: ``<name>-http.sock`` beside a ``unix:`` ``authz``
    socket (``unix:/run/agent-authz/ctl/authz-http.sock``); none beside a TCP ``authz``, where HTTP
    checks then use gRPC."""
    admin: str = "127.0.0.1:9902"
    """The admin HTTP server (JWKS, ``/healthz``, ``/readyz``, ``/metrics``, ``/decisions``, the task
    API): ``host:port`` or ``unix:/absolute/path``."""
    health: str | None = None
    """``host:port`` of a probe server with only ``/healthz``, ``/readyz``, ``/envoy/ready`` (Envoy's
    admin ``/ready``, relayed) and ``/proxy/ready`` (both ready) and one-word bodies, for kubelet
    probes (the chart: ``0.0.0.0:15021``)."""

    @field_validator("health")
    @classmethod
    def _health(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("unix:"):
            raise ValueError("expected host:port (kubelet probes speak TCP)")
        return value

    def http_authz(self) -> str | None:
        """Where the ext_authz HTTP service listens: ``authz_http``, or its default beside a
        ``unix:`` ``authz`` socket (``None`` beside a TCP one)."""
        if self.authz_http is not None:
            return self.authz_http
        if not self.authz.startswith("unix:"):
            return None
        path = Path(self.authz[5:])
        return f"unix:{path.with_name(f'{path.stem}-http.sock')}"

    @model_validator(mode="after")
    def _distinct(self) -> ListenSpec:
        if self.http_authz() == self.authz:
            raise ValueError("listen.authz_http must differ from listen.authz (two servers)")
        return self

    @field_validator("authz", "authz_http", "admin", "health")
    @classmethod
    def _addr(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("unix:"):
            if not value[5:].startswith("/") or len(value[5:].encode()) > 107:
                raise ValueError("unix: needs an absolute socket path of at most 107 bytes")
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port or unix:/path")
        return value


class EnvoySpec(_Model):
    """Settings used when rendering the Envoy bootstrap (``agent-authz envoy-config``).

    Like the bootstrap, the dynamic listeners and clusters the sidecar writes for Envoy (with
    ``intercept``) are rendered from this section as it was at start: a changed
    ``envoy.destinations`` needs a restart (tasks added later are still intercepted).
    """

    egress_address: str = "127.0.0.1"
    """Address of Envoy's egress listener (the ``HTTP_PROXY`` target)."""
    egress_port: int = Field(default=15001, ge=0, le=65535)
    """Port of the egress listener (``0``: any free port); must differ from ``outbound_port``."""
    admin_socket: Path | None = CONTROL_DIR / "envoy-admin.sock"
    """Envoy's admin interface on this Unix socket (``admin.address.pipe``, mode ``0600``; its directory
    is created ``0700`` by ``agent-authz envoy``); the probe server relays ``/ready`` from it. ``null``:
    TCP on ``127.0.0.1:admin_port``, where every process of the pod can change Envoy's log level, stop
    it or flip its readiness (a startup warning)."""
    admin_port: int = Field(default=15000, ge=0, le=65535)
    """With ``admin_socket: null`` only: Envoy's admin port, on ``127.0.0.1``."""
    authz_timeout: Seconds = 0.25
    """ext_authz timeout; on timeout Envoy answers 503 (fail closed)."""
    authz_transport: Literal["http", "grpc"] = "http"
    """How Envoy asks about HTTP requests: ``http`` - Envoy's HTTP ext_authz service, to
    ``listen.authz_http`` (measured 1.5x the throughput of gRPC for the same decisions, at under half the CPU:
    ``docs/performance.md``); ``grpc`` - ``Check`` on ``listen.authz``. Connection checks, ext_proc,
    SDS, Envoy's refusal logs and the check of a ``CONNECT`` always use gRPC. Without an HTTP service
    address (a TCP ``listen.authz`` and no ``listen.authz_http``) HTTP checks use gRPC too. Takes effect
    when the bootstrap is rendered."""
    inspect_timeout: Seconds = 5.0
    """How long the ``outbound`` listener waits for a connection's first bytes to tell TLS from HTTP
    (0.5 s - 60 s; an HTTP or TLS client sends at once): then it is judged as TCP (``tcp_not_allowed``,
    recorded); one that sends nothing is closed after twice as long and recorded (``refused_by_proxy``)."""
    destinations: dict[str, str] = Field(default_factory=dict)
    """``host: address:port`` for upstreams with a static address (exact hosts); other hosts are
    resolved by DNS."""
    ingress_address: str = "0.0.0.0"
    """Address of the mTLS ingress listener."""
    ingress_port: int = Field(default=15006, ge=0, le=65535)
    """Port of the ingress listener (and of the inbound one with ``inbound_redirect``)."""
    local_app: str | None = None
    """``host:port`` of the agent's own server; with an identity source, renders the mTLS ingress
    listener ``ingress_https``."""
    sds_dir: Path | None = None
    """Where ``envoy-config`` writes file-based SDS resources (``identity.source: files``); default
    ``<bootstrap>-sds/`` beside the bootstrap."""
    outbound_port: int | None = Field(default=None, ge=1, le=65535)
    """Renders the transparent ``outbound`` listener that ``agent-authz iptables`` redirects to."""
    outbound_address: str = "127.0.0.1"
    """Address of the ``outbound`` listener."""
    inbound_redirect: bool = False
    """The inbound listener accepts redirected connections (``original_dst``) and forwards each to
    ``127.0.0.1:<original port>``; needs an identity source and a fixed ``ingress_port``."""
    upstream_ca: Path | None = None
    """PEM CA bundle that upstream certificates of ``tls: originate`` and ``tls: intercept`` rules are
    verified against; default: the system bundle ``/etc/ssl/certs/ca-certificates.crt``."""
    ipv6: bool = False
    """The ``outbound`` listener also listens on ``[::1]``, the inbound one on ``[::]`` (for
    ``agent-authz iptables --ipv6 same``)."""
    rpc_body_cap: ByteSize = ByteSize(64 * 1024)
    """Largest JSON-RPC request body judged on MCP/A2A routes (1 KiB - 1 MiB); Envoy buffers one
    byte more, so a longer body is denied with ``mcp_body_too_large`` (and recorded)."""
    rpc_hosts: dict[str, Literal["mcp", "a2a"]] = Field(default_factory=dict)
    """``host: mcp|a2a`` for MCP/A2A hosts that only grants name (hosts of ``protocol: mcp``/``a2a``
    rules in ``tasks`` are found by themselves): their Envoy route buffers the body for the sidecar
    and, for MCP, filters ``tools/list`` responses through ext_proc."""
    approval_hosts: list[str] = Field(default_factory=list)
    """Plain-HTTP hosts whose Envoy route buffers the request body (up to ``rpc_body_cap``) so that an
    approval binds its digest: those only grants name with ``approval`` rules (hosts of ``approval``
    rules in ``tasks`` are found by themselves). A body-carrying call there without one is refused
    ``approval_body_unavailable``."""
    mcp_header_decisions: list[str] = Field(default_factory=list)
    """MCP hosts whose servers implement the 2026-07-28 header checks (a request whose
    ``Mcp-Method``/``Mcp-Name`` disagree with its body is rejected with ``-32020``): requests there
    carrying ``Mcp-Method`` are judged on the headers alone, no body buffered."""

    @field_validator("inspect_timeout")
    @classmethod
    def _inspect_timeout(cls, value: float) -> float:
        if not 0.5 <= value <= 60:
            raise ValueError("inspect_timeout must be between 500ms and 60s")
        return value

    @field_validator("rpc_body_cap")
    @classmethod
    def _rpc_body_cap(cls, value: ByteSize) -> ByteSize:
        if not 1024 <= value <= 1 << 20:
            raise ValueError("rpc_body_cap must be between 1 KiB and 1 MiB")
        return value

    @field_validator("rpc_hosts", "mcp_header_decisions", "approval_hosts")
    @classmethod
    def _rpc_host_names(cls, value: Any) -> Any:
        for host in value:
            if not _HOST.match(host) or host.startswith("*."):
                raise ValueError(f"{host!r} must be an exact DNS name (Envoy renders one route per host)")
        return value

    @model_validator(mode="after")
    def _interception(self) -> EnvoySpec:
        if self.outbound_port is not None and self.outbound_port == self.egress_port:
            raise ValueError("outbound_port and egress_port must differ (two listeners)")
        if self.inbound_redirect and self.ingress_port == 0:
            raise ValueError("inbound_redirect needs a fixed ingress_port (the iptables rules name it)")
        return self

    @field_validator("admin_socket")
    @classmethod
    def _admin_socket(cls, value: Path | None) -> Path | None:
        if value is not None and len(os.fsencode(value)) > 107:
            raise ValueError("a Unix socket path of at most 107 bytes")
        return value

    @field_validator("local_app")
    @classmethod
    def _local_app(cls, value: str | None) -> str | None:
        if value is not None:
            addr, sep, port = value.rpartition(":")
            if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("local_app must be host:port")
        return value

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: dict[str, str]) -> dict[str, str]:
        for host, address in value.items():
            if not _HOST.match(host) or host.startswith("*."):
                raise ValueError(f"destination {host!r} must be an exact DNS name")
            addr, sep, port = address.rpartition(":")
            if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"destination {host!r}: address must be host:port")
        return value


class DnsSpec(_Model):
    """DNS control: the agent's DNS (UDP and TCP port 53, to any server: ``agent-authz iptables
    --dns-port``) reaches the sidecar's DNS proxy, which answers only the names an active rule of the
    local agent allows (its exact and ``*.suffix`` hosts) and those of ``allow``, by asking the pod's
    own resolvers (``resolv_conf``); every other query is refused with a decision record
    (``dns_not_allowed``). The addresses it answered bind ``tls: passthrough`` connections to their
    name. These settings take effect at start."""

    listen: str = "127.0.0.1:15053"
    """``host:port`` of the proxy, UDP and TCP (also ``[::1]`` on the same port with ``envoy.ipv6``); the
    iptables rules redirect port 53 there."""
    resolv_conf: Path = Path("/etc/resolv.conf")
    """The resolv.conf the pod was given: its ``nameserver`` lines are the resolvers allowed names are
    forwarded to (read at start)."""
    allow: list[str] = Field(default_factory=list)
    """Names the pod needs besides the tasks' hosts: exact names or ``*.suffix`` (e.g. ``*.cluster.local``
    for the cluster's services; what such a suffix lets through is in docs/concepts/interception.md)."""
    refuse_with: Literal["nxdomain", "refused"] = "nxdomain"
    """The answer to a refused query: ``nxdomain`` (glibc goes on with the next search domain, so a name
    allowed under its absolute form still resolves) or ``refused``; either carries an Extended DNS
    Error (RFC 8914) naming the decision."""
    timeout: Seconds = 2.0
    """How long one resolver may take to answer (then the next is asked; none: SERVFAIL)."""
    allowed_record_interval: Seconds = 300.0
    """Allowed lookups are counted (``agent_authz_dns_queries``) and recorded once per name and type in
    this interval (0: every lookup); refused queries are always recorded."""
    binding_min_ttl: Seconds = 60.0
    """How long, at least, an answered address stays an address of its name for ``tls: passthrough``
    (clients keep answers past their TTL; at most one day)."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port")
        return value

    @field_validator("allow")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            lowered = name.lower().removesuffix(".")
            if not _HOST.match(lowered) or len(lowered) > 253:
                raise ValueError(f"{name!r} must be a DNS name or '*.' followed by a DNS suffix")
            out.append(lowered)
        return out

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0.1 <= value <= 30:
            raise ValueError("timeout must be between 100ms and 30s")
        return value

    @field_validator("allowed_record_interval", "binding_min_ttl")
    @classmethod
    def _interval(cls, value: float) -> float:
        if not 0 <= value <= 86400:
            raise ValueError("must be between 0s and 1d")
        return value


class InterceptSpec(_Model):
    """TLS interception for ``tls: intercept`` rules: the per-pod CA and where its files go.

    The sidecar creates the CA (EC P-256, valid ``ca_ttl``, name-constrained to DNS names) at start
    and keeps its key in ``state_dir/ca/`` (``0600``), so a restarted sidecar keeps the CA the agent
    already trusts. Leaves (one per intercepted host, valid ``leaf_ttl``) reach Envoy over gRPC SDS
    and never touch a disk. ``publish_dir`` receives only certificates. These settings take effect at
    start; a reload that changes them logs ``intercept_change_needs_restart``.
    """

    state_dir: Path
    """The proxy user's private directory (created ``0700``): the pod CA (``ca/``) and Envoy's dynamic
    listeners and clusters (``xds/``, file-based LDS/CDS). A memory-backed volume the agent container
    does not mount."""
    publish_dir: Path
    """Where ``ca.pem`` (the pod CA) and ``ca-bundle.pem`` (``system_bundle`` + the pod CA) are written
    for the agent: a volume mounted read-only into the agent container. Must not nest with
    ``state_dir``."""
    system_bundle: Path = SYSTEM_CA_BUNDLE
    """The system CAs the agent's bundle starts from (the sidecar image's; unreadable: a start error)."""
    ca_ttl: Seconds = 86400.0
    """Lifetime of the pod CA (10 m - 90 d); kept across sidecar restarts while two leaf lifetimes are
    left."""
    leaf_ttl: Seconds = 3600.0
    """Lifetime of each host certificate (2 s - 7 d, shorter than ``ca_ttl``)."""
    leaf_refresh_ahead: float = Field(default=1 / 3, gt=0, lt=1)
    """A leaf is re-minted when this fraction of its life is left."""

    @field_validator("ca_ttl")
    @classmethod
    def _ca_ttl(cls, value: float) -> float:
        if not 600 <= value <= 90 * 86400:
            raise ValueError("ca_ttl must be between 10m and 90d")
        return value

    @field_validator("leaf_ttl")
    @classmethod
    def _leaf_ttl(cls, value: float) -> float:
        if not 2 <= value <= 7 * 86400:
            raise ValueError("leaf_ttl must be between 2s and 7d")
        return value

    @model_validator(mode="after")
    def _dirs(self) -> InterceptSpec:
        if self.leaf_ttl >= self.ca_ttl:
            raise ValueError("leaf_ttl must be shorter than ca_ttl")
        state, publish = Path(os.path.normpath(self.state_dir)), Path(os.path.normpath(self.publish_dir))
        if state == publish or state in publish.parents or publish in state.parents:
            raise ValueError("state_dir (keys, proxy only) and publish_dir (certificates, for the agent) must not nest")
        return self


class RotateSpec(_Model):
    """When the decision log file is rotated (the hash chain continues into the next file)."""

    max_bytes: ByteSize | None = None
    """Rotate before the file would exceed this size (``64MiB``, ``10MB``, or bytes; at least 4 KiB)."""
    max_age: Seconds | None = None
    """Rotate before writing to a file whose first record is this old."""
    keep: int | None = Field(default=None, ge=1)
    """Rotated files to keep; older ones are deleted (verify the rest with ``logs verify --partial``).
    None: keep all."""

    @field_validator("max_bytes")
    @classmethod
    def _bytes(cls, value: ByteSize | None) -> ByteSize | None:
        if value is not None and value < 4096:
            raise ValueError("max_bytes must be at least 4 KiB")
        return value

    @field_validator("max_age")
    @classmethod
    def _age(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError("max_age must be at least 1s")
        return value


class DecisionLogSpec(_Model):
    """Where decision records go (a JSON-lines file and/or stdout), how durable and how chained.

    These settings take effect at start; a reload that changes them logs
    ``decision_log_change_needs_restart`` and keeps the running log as it is.
    """

    path: Path | None = None
    """JSON-lines file of hash-chained decision records."""
    stdout: bool = True
    """Also write decision records to stdout (at least one of ``path`` and ``stdout`` is required)."""
    fsync: bool = False
    """``true``: a record is ``fsync``-ed before Envoy gets the answer (group commit)."""
    hmac_key_file: Path | None = None
    """Chain with HMAC-SHA256 under this key (a Secret; at least 16 bytes, surrounding whitespace
    ignored) instead of plain SHA-256."""
    on_log_failure: Literal["deny", "allow"] = "deny"
    """``deny``: an allow whose record cannot be written becomes an ``internal_error`` deny; ``allow``:
    answer anyway."""
    rotate: RotateSpec = RotateSpec()
    """When the file is rotated (needs ``path``)."""

    @model_validator(mode="after")
    def _sinks(self) -> DecisionLogSpec:
        if self.path is None and not self.stdout:
            raise ValueError("decision records need a sink: set 'path' or 'stdout: true'")
        if self.path is None and self.rotate != RotateSpec():
            raise ValueError("'rotate' needs a 'path'")
        return self


class ViewerSpec(_Model):
    """The decision viewer (``/decisions`` on the admin port).

    Read at start; a reload that changes this section logs ``viewer_change_needs_restart`` and keeps
    the running viewer as it is.
    """

    logs: list[Path] = Field(default_factory=list, max_length=64)
    """Other sidecars' decision logs (JSON lines; rotated files included), e.g. those of the sub-agents
    this agent delegates to, on a shared volume or collected copies. Shown read-only next to this
    sidecar's own records, followed live, and counted in the summaries and delegation trees (what a
    sub-agent spent is only known from its own records). Their hash chains are not verified here
    (``agent-authz logs verify`` does that); a missing or unreadable file is named in the viewer, not
    an error."""
    recent_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    """Memory for the recent records the viewer shows (``8MiB``, ``32MB``, or bytes; 64 KiB - 1 GiB):
    the last 10,000 records (this sidecar's and those of ``logs``), kept as their JSON, at most this
    many bytes of it - the oldest go first, a single record larger than this is not kept (it is still
    counted in the summaries and shown live). Records are ~0.6-1.5 KB: the default holds ~8,000.
    Older records are for ``agent-authz logs``."""

    @field_validator("recent_bytes")
    @classmethod
    def _recent_bytes(cls, value: ByteSize) -> ByteSize:
        if not 64 * 1024 <= value <= 1024**3:
            raise ValueError("recent_bytes must be between 64 KiB and 1 GiB")
        return value


class QuarantineSpec(_Model):
    """The anomaly rule of every task: ``threshold`` denials of the kinds in ``reasons`` within
    ``window`` freeze the task and its delegation subtree (every call then ``task_quarantined``) until
    an operator unfreezes it. The freeze is a ``task_frozen`` control record naming the records that
    tripped it, published in ``ladder.publish`` for the sidecars of sub-agents. A task's own
    ``quarantine`` rule applies too: the stricter of the two (the lower threshold, the longer window).
    Hot-reloadable (the counts so far are kept)."""

    threshold: int = Field(default=0, ge=0, le=10_000)
    """Denials that freeze a task; 0: no sidecar-wide rule (a task's own rule still applies)."""
    window: Seconds = 60.0
    """Counted within this many seconds (10 ms - 1 day)."""
    reasons: list[Reason] = Field(default_factory=lambda: list(QUARANTINE_REASONS))
    """The reason codes that count: out-of-task kinds only (``host_not_allowed``, ``port_not_allowed``,
    ``method_not_allowed``, ``path_not_allowed``, the MCP ``tool_not_allowed``, ``argument_not_allowed``,
    ``resource_not_allowed``, ``prompt_not_allowed``, ``rpc_method_not_allowed``,
    ``sensitivity_not_allowed``: the default; also ``tls_not_allowed``, ``tcp_not_allowed``,
    ``approval_mismatch``, ``approval_replayed``). Never ``budget_exhausted``, ``task_expired`` and the like."""
    dry_run: bool = False
    """Record ``would_quarantine`` (with the evidence) instead of freezing (also in ``dry_run`` mode)."""

    @field_validator("window")
    @classmethod
    def _window(cls, value: float) -> float:
        if not 0.01 <= value <= 86400:
            raise ValueError("window must be between 10ms and 1d")
        return value

    @field_validator("reasons")
    @classmethod
    def _reasons(cls, value: list[Reason]) -> list[Reason]:
        wrong = [r.value for r in value if r not in _COUNTABLE]
        if wrong:
            raise ValueError(f"{wrong} are not out-of-task kinds; countable: {[r.value for r in _COUNTABLE]}")
        return value


class LadderSpec(_Model):
    """Freeze, unfreeze and kill: signed actions (``agent-authz task freeze|unfreeze|kill``) this sidecar
    honours, and where it publishes its own (its quarantines), for the sidecars of its sub-agents.

    An action is a compact JWS (``typ: agent-authz-action+jwt``) naming a target - an agent's SPIFFE
    ID, a task, or a task with everything delegated below it. A root issuer may do anything; an agent
    (its X.509-SVID) may freeze or kill what it could revoke (its own tasks, what it delegated, and
    below); only a root issuer unfreezes. Honoured actions are kept in the durable state."""

    files: list[Path] = Field(default_factory=list)
    """Files of signed actions (one compact JWS per line) to honour; watched (a missing file is empty)."""
    publish: Path | None = None
    """Where this sidecar writes its own signed actions (its quarantines), one per line."""


class ApprovalsSpec(_Model):
    """Human approvals of ``approval`` rules: who may approve, and how long an approval lasts."""

    approvers: list[SpiffeIdStr] = Field(default_factory=list)
    """SPIFFE IDs whose X.509-SVID may sign approvals and operator tokens (root issuers always may)."""
    default_ttl: Seconds = 600.0
    """How long an approval stays usable when ``agent-authz approve`` names no ``--ttl``."""
    max_ttl: Seconds = 3600.0
    """Longest usable time of an approval (a longer ``--ttl`` is cut to this; never past the task's end)."""
    pending_ttl: Seconds = 3600.0
    """A call waiting for approval is forgotten after this long."""
    max_pending: int = Field(default=100, ge=1, le=100_000)
    """Calls waiting for approval per task; a new one drops the oldest."""

    @model_validator(mode="after")
    def _ttls(self) -> ApprovalsSpec:
        for name in ("default_ttl", "max_ttl", "pending_ttl"):
            if not 1 <= getattr(self, name) <= 7 * 86400:
                raise ValueError(f"{name} must be between 1s and 7d")
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")
        return self


class SensitivitySpec(_Model):
    """Sensitivity labels of destinations: per host (the operator's data classification), and the
    label of a destination no rule or host labels."""

    default: Sensitivity = "internal"
    """The label of a call whose rule and host carry none."""
    hosts: dict[str, Sensitivity] = Field(default_factory=dict)
    """Exact host or ``*.suffix`` -> label (the most specific entry applies; the higher of it and the
    rule's own label counts)."""

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: dict[str, str]) -> dict[str, str]:
        for host in value:
            if host != host.lower() or not _HOST.match(host):
                raise ValueError(f"{host!r} must be a lower-case DNS name or '*.' followed by a DNS suffix")
        return value


class StateSpec(_Model):
    """The durable enforcement state: what must survive a sidecar restart or crash (``kill -9``).

    Revocations (own and received), call budgets and delegation reservations, grants accepted through
    ``POST /v1/tasks``, delegated child ids and the anchor time of every ``ttl`` are kept in one SQLite
    database in WAL mode (see docs/concepts/state.md). A call charging a budget is committed there
    before it is allowed. The file is refused at start (the sidecar does not start) when it is not an
    agent-authz state file, belongs to another agent, has a newer schema, is corrupt, or when it or its
    directory is accessible to another user. These settings take effect at start; a reload that
    changes them logs ``state_change_needs_restart``.
    """

    path: Path | None = None
    """The state file; its directory is created ``0700`` and must be the proxy user's alone (the file
    is ``0600``). In Kubernetes: ``/var/lib/agent-authz/state/state.db`` in an emptyDir only the
    sidecar mounts. None: nothing survives a restart (development only; a warning at start)."""
    synchronous: Literal["normal", "full"] = "normal"
    """SQLite ``synchronous`` in WAL mode. ``normal``: every commit reaches the operating system before
    the answer (survives a crash of the sidecar); a power loss of the node may lose the last commits
    since the previous checkpoint. ``full``: also ``fsync`` each commit (survives a power loss; costs
    an ``fsync`` per budgeted call)."""


class SidecarConfig(_Model):
    """The whole ``sidecar.yaml``: every key, section by section.

    Unknown keys are errors. Relative paths are resolved against the config file's directory.
    Durations are numbers of seconds or strings such as ``250ms``, ``30s``, ``5m``, ``1h30m``, ``1d``.
    Validation names the file, the field and the reason; a reload that fails validation keeps the
    previous configuration.
    """

    agent: SpiffeIdStr | None = None
    """The local agent's SPIFFE ID (strict SPIFFE-ID §2); required without ``identity``, with it only
    a cross-check of the SVID (a mismatch is an error)."""
    identity: IdentitySpec | None = None
    """Where the agent's SVID and the trust bundles come from; none: ``agent`` from the config, no
    ingress possible (development only)."""
    ingress: IngressSpec = IngressSpec()
    """Who may call the agent."""
    issuer: IssuerSpec
    """The token issuer."""
    listen: ListenSpec = ListenSpec()
    """Where the sidecar listens."""
    envoy: EnvoySpec = EnvoySpec()
    """How Envoy's bootstrap is rendered."""
    decision_log: DecisionLogSpec = DecisionLogSpec()
    """Where decision records go."""
    viewer: ViewerSpec = ViewerSpec()
    """The decision viewer."""
    state: StateSpec = StateSpec()
    """The durable enforcement state (revocations, budgets, posted grants, ``ttl`` anchors, freezes,
    approvals)."""
    quarantine: QuarantineSpec = QuarantineSpec()
    """The anomaly rule: freeze a task that keeps trying things outside it."""
    ladder: LadderSpec = LadderSpec()
    """Signed freeze / unfreeze / kill actions to honour, and where to publish this sidecar's own."""
    approvals: ApprovalsSpec = ApprovalsSpec()
    """Human approvals of ``approval`` rules."""
    sensitivity: SensitivitySpec = SensitivitySpec()
    """Sensitivity labels of hosts, and the default label."""
    credentials: dict[str, CredentialSpec] = Field(default_factory=dict)
    """Name (1-64 characters of ``a-z0-9._-``) → API key that rules and grants refer to by name."""
    grants: GrantsSpec = GrantsSpec()
    """Signed task grants, delegation and revocation lists."""
    dns: DnsSpec | None = None
    """DNS control (the sidecar's DNS proxy); none: the agent's DNS is not answered by the sidecar (the
    iptables rules still redirect it, unless port 53 is excluded), and ``tls: passthrough`` binds only
    to ``envoy.destinations`` pins."""
    intercept: InterceptSpec | None = None
    """HTTPS interception (``tls: intercept`` rules); none: such rules are config errors."""
    task_files: list[TaskFileSpec] = Field(default_factory=list)
    """Tasks in files of their own - in Kubernetes the pod annotations ``agent-authz.io/task`` and
    ``agent-authz.io/revoked`` mounted through a downward-API volume; watched."""
    dry_run: bool = False
    """Decide and log, but let every call through (a denied call is answered ``dry_run``, without token
    or key); hot-reloadable."""
    tasks: list[TaskSpec] = Field(default_factory=list)
    """The declared tasks."""

    @model_validator(mode="after")
    def _agent_known(self) -> SidecarConfig:
        if self.agent is None and self.identity is None:
            raise ValueError("set 'agent' or an 'identity' source")
        for task in self.tasks:
            for rule in task.egress:
                if isinstance(rule.credential, str) and rule.credential not in self.credentials:
                    raise ValueError(f"task {task.id!r}: credential {rule.credential!r} is not in 'credentials'")
        if self.grants.revocation_feed is not None and self.identity is None:
            raise ValueError("grants.revocation_feed needs an 'identity' source (the feed is mTLS with the SVID)")
        if self.envoy.inbound_redirect and self.identity is None:
            raise ValueError("envoy.inbound_redirect needs an 'identity' source (the inbound listener is mTLS)")
        upstream: dict[str, tuple[int, str]] = {}
        for t_index, task in enumerate(self.tasks):
            for r_index, rule in enumerate(task.egress):
                if rule.tls != "originate":
                    continue
                port, where = rule.upstream_port or 443, f"tasks[{t_index}].egress[{r_index}]"
                seen = upstream.setdefault(rule.host, (port, where))
                if seen[0] != port:
                    raise ValueError(
                        f"{where}: 'tls: originate' for {rule.host} with upstream_port {port}, "
                        f"but {seen[1]} says {seen[0]} (one upstream per host)"
                    )
        located = [
            (f"tasks[{t}].egress[{r}]", rule) for t, task in enumerate(self.tasks) for r, rule in enumerate(task.egress)
        ]
        conflict = tls_rule_conflicts(located)
        if conflict is not None:
            raise ValueError(conflict)
        if self.intercept is None:
            for where, rule in located:
                if rule.tls == "intercept":
                    raise ValueError(f"{where}: 'tls: intercept' needs the 'intercept' section (the per-pod CA)")
        return self

    def rpc_hosts(self) -> dict[str, str]:
        """``host -> mcp|a2a`` for every exact host an MCP/A2A rule of ``tasks`` names, and
        ``envoy.rpc_hosts``: the hosts whose Envoy route buffers the body and (MCP) filters
        ``tools/list`` responses."""
        hosts = {
            rule.host: rule.protocol
            for task in self.tasks
            for rule in task.egress
            if rule.protocol != "http" and not rule.host.startswith("*.")
        }
        return {**hosts, **self.envoy.rpc_hosts}

    def http_checks(self) -> str | None:
        """The address of the ext_authz HTTP service when HTTP checks use it (``envoy.authz_transport:
        http`` and :meth:`ListenSpec.http_authz` has one), else ``None`` (HTTP checks use gRPC)."""
        return self.listen.http_authz() if self.envoy.authz_transport == "http" else None

    def approval_hosts(self) -> list[str]:
        """Exact plain-HTTP hosts of ``approval`` rules in ``tasks``, and ``envoy.approval_hosts``:
        their Envoy route buffers the body for the sidecar (MCP/A2A hosts buffer it anyway)."""
        hosts = {
            rule.host
            for task in self.tasks
            for rule in task.egress
            if rule.approval is not None and rule.protocol == "http" and not rule.host.startswith("*.")
        }
        rpc = self.rpc_hosts()
        return sorted((hosts | set(self.envoy.approval_hosts)) - set(rpc))

    def originate_hosts(self) -> dict[str, int]:
        """``host -> upstream port`` of every ``tls: originate`` rule (Envoy renders one TLS route each)."""
        return {
            rule.host: rule.upstream_port or 443
            for task in self.tasks
            for rule in task.egress
            if rule.tls == "originate"
        }

    @field_validator("credentials")
    @classmethod
    def _credential_names(cls, value: dict[str, CredentialSpec]) -> dict[str, CredentialSpec]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"credential name {name!r}: 1-64 characters of a-z 0-9 . _ -")
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        for task in tasks:
            if task.id in seen:
                raise ValueError(f"duplicate task id {task.id!r}")
            seen.add(task.id)
        return tasks
