"""The schema of ``sidecar.yaml``, as pydantic models.

Every model is frozen and forbids unknown keys, so a typo is an error, not a silently ignored
setting. See the README's "Configuration reference" for the prose version of this file.
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

from sidecar.config.durations import parse_duration
from sidecar.errors import BadRequestError, SpiffeIdError
from sidecar.http_norm import normalize_path
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = [
    "CallerSpec",
    "CredentialSpec",
    "DecisionLogSpec",
    "EgressRuleSpec",
    "EnvoySpec",
    "GrantsSpec",
    "IdentityFilesSpec",
    "IdentitySpec",
    "IngressRuleSpec",
    "IngressSpec",
    "InterceptSpec",
    "IssuerSpec",
    "ListenSpec",
    "RootIssuerSpec",
    "RotateSpec",
    "SidecarConfig",
    "SpiffeIdStr",
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
_NO_HTTP_MATCH = ("methods", "paths", "audience", "scope", "credential")
_TLS_PORT_MODES = ("passthrough", "intercept")
_FORBIDDEN_CREDENTIAL_HEADERS = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "te", "upgrade", "x-agent-task"}
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


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

    ``file`` is read at load and on every reload; its content (stripped of surrounding whitespace)
    prefixed with ``prefix`` is set in ``header``, overwriting any agent-supplied value.
    """

    header: str
    file: Path
    prefix: str = ""

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _TOKEN.match(value) or value.startswith(":"):
            raise ValueError("not a valid HTTP header name")
        lowered = value.lower()
        if lowered in _FORBIDDEN_CREDENTIAL_HEADERS or lowered.startswith("x-agent-authz-"):
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

    ``paths`` syntax: ``/exact/path`` matches only that path; ``/prefix/*`` matches every path
    below ``/prefix/`` (not ``/prefix`` itself, nor ``/prefixes``); ``*`` matches any path. Paths are
    compared after normalization (decoded once, dot segments removed, slashes merged); the query
    string is never part of the match. ``methods`` are HTTP methods, or ``["*"]`` for any.
    """

    methods: list[str] = Field(min_length=1)
    paths: list[str] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = []
        for method in value:
            if method != "*" and not _TOKEN.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
            out.append(method.upper())
        return out

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


class EgressRuleSpec(_HttpMatchSpec):
    """One outbound call pattern a task allows.

    ``host`` is an exact DNS name or ``*.suffix``; ``methods`` and ``paths`` as in :class:`_HttpMatchSpec`.

    ``tls`` (transparent interception):

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
      exact DNS name - no ``*.`` wildcard and no IP address (:func:`intercept_host_problem`) - since
      the pod CA certifies exactly that name (RFC 6125 §6.4.1 reference identifiers).
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
        return data

    name: str | None = Field(default=None, max_length=128)
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    audience: str | None = None
    scope: str | None = None
    max_calls: int | None = Field(default=None, ge=0)
    token: bool = True
    credential: CredentialRef | None = None
    tls: Literal["none", "passthrough", "originate", "intercept"] = "none"
    upstream_port: int | None = Field(default=None, ge=1, le=65535)

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


class TaskSpec(_Model):
    """A declared task: who works, for whom, why, until when, and which calls it may make.

    Validity: ``not_before`` (default: at once) and exactly one of ``expires_at`` (an absolute
    RFC 3339 time with offset) or ``ttl`` (a duration counted from ``not_before``, or, without it,
    from the moment this sidecar first loaded the task; a reload does not extend it).
    """

    id: str
    agent: SpiffeIdStr
    on_behalf_of: str | None = Field(default=None, min_length=1, max_length=512)
    purpose: str = Field(min_length=1, max_length=1024)
    not_before: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    ttl: Seconds | None = None
    max_calls: int | None = Field(default=None, ge=0)
    revoked: bool = False
    egress: list[EgressRuleSpec] = Field(default_factory=list)

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
    """The SPIFFE Workload API (a SPIRE agent socket)."""

    socket: str = "unix:///run/spire/sockets/agent.sock"
    timeout: Seconds = 10.0
    svid_secret: str = "default"  # noqa: S105 - SPIRE's SDS resource names
    bundle_secret: str = "ALL"  # noqa: S105

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: str) -> str:
        if not value.startswith("unix:///") or len(value) > 7 + 107:
            raise ValueError("expected unix:///absolute/path (at most 107 bytes of path)")
        return value


class IdentityFilesSpec(_Model):
    """An X.509-SVID and trust bundles from PEM files (watched; rotation needs no restart).

    ``bundles`` maps each trust domain to a PEM file of its X.509 authorities (federation: one entry
    per trust domain); ``jwt_bundles`` maps trust domains to JWKS files of JWT-SVID signers.
    """

    svid: Path
    key: Path
    bundles: dict[str, Path] = Field(min_length=1)
    jwt_bundles: dict[str, Path] = Field(default_factory=dict)

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
    """Where this agent's identity and the trust bundles come from."""

    source: Literal["workload_api", "files"]
    workload_api: WorkloadApiSpec = WorkloadApiSpec()
    files: IdentityFilesSpec | None = None

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
    trust_domain: str | None = None
    path_prefix: str | None = None

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
    callers: list[CallerSpec] = Field(min_length=1)


class IngressSpec(_Model):
    """Inbound policy: default deny; each rule names callers, methods and paths.

    ``jwt_svid``: accept ``Authorization: Bearer <JWT-SVID>`` as the caller's identity (verified
    against the JWT bundle of its trust domain, ``aud`` one of ``audiences``, default: this agent's
    SPIFFE ID). Without a JWT-SVID the caller is the mTLS peer's X.509-SVID.
    """

    jwt_svid: bool = True
    audiences: list[str] = Field(default_factory=list)
    rules: list[IngressRuleSpec] = Field(default_factory=list)


class RootIssuerSpec(_Model):
    """Who may sign root task grants: a key set (``jwks`` file, keys chosen by ``kid``) or a workload
    (``spiffe_id``) signing with its X.509-SVID (``x5c``, verified against its trust domain's bundle)."""

    jwks: Path | None = None
    spiffe_id: SpiffeIdStr | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RootIssuerSpec:
        if (self.jwks is None) == (self.spiffe_id is None):
            raise ValueError("set exactly one of 'jwks' or 'spiffe_id'")
        return self


class TaskFileSpec(_Model):
    """A task declared in a file of its own - in Kubernetes, a pod annotation mounted through a
    downward-API volume, so that changing the annotation reaches the sidecar without a restart.

    ``path`` holds either a signed grant (a compact JWS, verified like ``grants.files``) or one task
    in YAML/JSON (the shape of a ``tasks[]`` entry; ``agent`` defaults to this agent). A missing or
    empty file declares nothing. ``revoked`` names a file whose content ``true`` revokes that task.
    """

    path: Path
    revoked: Path | None = None


class GrantsSpec(_Model):
    """Signed task grants (``agent-task+jwt``) this sidecar accepts, and delegation limits.

    ``files``: compact-JWS grant files (watched; a Kubernetes annotation mounted through the
    downward API works as a file). ``root_issuers``: who may sign root grants. ``max_depth``: the
    longest delegation chain accepted or issued (a root grant has depth 0). ``revocations``: signed
    revocation-list files to honour. ``publish_revocations``: where ``POST /v1/tasks/{id}/revoke``
    writes this sidecar's own signed revocation list.
    """

    files: list[Path] = Field(default_factory=list)
    root_issuers: list[RootIssuerSpec] = Field(default_factory=list)
    max_depth: int = Field(default=3, ge=0, le=16)
    revocations: list[Path] = Field(default_factory=list)
    publish_revocations: Path | None = None


class IssuerSpec(_Model):
    """The token issuer: who signs task-scoped access tokens (RFC 9068) and with which key."""

    url: str = Field(min_length=1)
    signing_key: Path
    next_signing_key: Path | None = None
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    max_token_ttl: Seconds = 300.0
    refresh_ahead: float = Field(default=0.25, gt=0, lt=1)
    mint_per_call: bool = False
    bind_to_svid: bool = False

    @field_validator("max_token_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("max_token_ttl must be between 1s and 24h")
        return value


class ListenSpec(_Model):
    """Where the sidecar listens: ``host:port`` or ``unix:/path`` for the gRPC ext_authz service.

    ``health`` (optional, ``host:port``): a plain HTTP server with only ``/healthz``, ``/readyz`` and
    ``/envoy/ready`` (Envoy's admin ``/ready``, relayed) and minimal bodies, for kubelet probes, which
    cannot reach the admin port on ``127.0.0.1`` (the Helm chart uses ``0.0.0.0:15021``).
    """

    authz: str = "127.0.0.1:9191"
    admin: str = "127.0.0.1:9902"
    health: str | None = None

    @field_validator("health")
    @classmethod
    def _health(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("unix:"):
            raise ValueError("expected host:port (kubelet probes speak TCP)")
        return value

    @field_validator("authz", "admin", "health")
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
    """Settings used when rendering the Envoy bootstrap (``agent-authz envoy-config``)."""

    egress_address: str = "127.0.0.1"
    egress_port: int = Field(default=15001, ge=0, le=65535)
    admin_port: int = Field(default=15000, ge=0, le=65535)
    authz_timeout: Seconds = 0.25
    destinations: dict[str, str] = Field(default_factory=dict)
    ingress_address: str = "0.0.0.0"
    ingress_port: int = Field(default=15006, ge=0, le=65535)
    local_app: str | None = None
    sds_dir: Path | None = None
    outbound_port: int | None = Field(default=None, ge=1, le=65535)
    outbound_address: str = "127.0.0.1"
    inbound_redirect: bool = False
    upstream_ca: Path | None = None
    ipv6: bool = False

    @model_validator(mode="after")
    def _interception(self) -> EnvoySpec:
        if self.outbound_port is not None and self.outbound_port == self.egress_port:
            raise ValueError("outbound_port and egress_port must differ (two listeners)")
        if self.inbound_redirect and self.ingress_port == 0:
            raise ValueError("inbound_redirect needs a fixed ingress_port (the iptables rules name it)")
        return self

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


class InterceptSpec(_Model):
    """TLS interception for ``tls: intercept`` rules: the per-pod CA and where its files go.

    The sidecar creates the CA (EC P-256, valid ``ca_ttl``) at start and keeps its private key in
    memory only. ``publish_dir`` receives only certificates, for the agent container: ``ca.pem``
    (the pod CA) and ``ca-bundle.pem`` (``system_bundle`` followed by the pod CA).
    ``state_dir`` (created ``0700``; Envoy runs as the same user) receives what Envoy reads: a
    leaf certificate and key per intercepted host (file-based SDS) and the dynamic listeners and
    clusters (file-based LDS/CDS); mount a memory-backed volume there that the agent container does
    not mount. Leaves are valid ``leaf_ttl`` and re-minted when ``leaf_refresh_ahead`` of their
    life is left.
    """

    state_dir: Path
    publish_dir: Path
    system_bundle: Path = SYSTEM_CA_BUNDLE
    ca_ttl: Seconds = 86400.0
    leaf_ttl: Seconds = 3600.0
    leaf_refresh_ahead: float = Field(default=1 / 3, gt=0, lt=1)

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
    max_age: Seconds | None = None
    keep: int | None = Field(default=None, ge=1)

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

    These settings take effect at start; a reload that changes them logs a warning and keeps the
    running log as it is.
    """

    path: Path | None = None
    stdout: bool = True
    fsync: bool = False
    hmac_key_file: Path | None = None
    on_log_failure: Literal["deny", "allow"] = "deny"
    rotate: RotateSpec = RotateSpec()

    @model_validator(mode="after")
    def _sinks(self) -> DecisionLogSpec:
        if self.path is None and not self.stdout:
            raise ValueError("decision records need a sink: set 'path' or 'stdout: true'")
        if self.path is None and self.rotate != RotateSpec():
            raise ValueError("'rotate' needs a 'path'")
        return self


class ViewerSpec(_Model):
    """The decision viewer (``/decisions`` on the admin port).

    ``logs``: other sidecars' decision logs (JSON lines; rotated files included), e.g. those of the
    sub-agents this agent delegates to, on a shared volume or collected copies. The viewer shows
    their records read-only next to its own, follows them live, and counts them in its summaries
    and delegation trees (what a sub-agent spent is only known from its own records). Their hash
    chains are not verified here (``agent-authz logs verify`` does that). Read at start; a reload
    that changes the list logs a warning.
    """

    logs: list[Path] = Field(default_factory=list, max_length=64)


class SidecarConfig(_Model):
    """The whole ``sidecar.yaml``.

    ``agent`` is the local agent's SPIFFE ID. With an ``identity`` source it is optional and only a
    cross-check: the ID in the SVID is authoritative, and a mismatch is an error.
    """

    agent: SpiffeIdStr | None = None
    identity: IdentitySpec | None = None
    ingress: IngressSpec = IngressSpec()
    issuer: IssuerSpec
    listen: ListenSpec = ListenSpec()
    envoy: EnvoySpec = EnvoySpec()
    decision_log: DecisionLogSpec = DecisionLogSpec()
    viewer: ViewerSpec = ViewerSpec()
    credentials: dict[str, CredentialSpec] = Field(default_factory=dict)
    grants: GrantsSpec = GrantsSpec()
    intercept: InterceptSpec | None = None
    task_files: list[TaskFileSpec] = Field(default_factory=list)
    dry_run: bool = False
    tasks: list[TaskSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _agent_known(self) -> SidecarConfig:
        if self.agent is None and self.identity is None:
            raise ValueError("set 'agent' or an 'identity' source")
        for task in self.tasks:
            for rule in task.egress:
                if isinstance(rule.credential, str) and rule.credential not in self.credentials:
                    raise ValueError(f"task {task.id!r}: credential {rule.credential!r} is not in 'credentials'")
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
