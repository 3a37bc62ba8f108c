"""The schema of ``sidecar.yaml``, as pydantic models.

Every model is frozen and forbids unknown keys, so a typo is an error, not a silently ignored
setting. See the README's "Configuration reference" for the prose version of this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sidecar.config.durations import parse_duration
from sidecar.errors import BadRequestError, SpiffeIdError
from sidecar.http_norm import normalize_path
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = [
    "CredentialSpec",
    "DecisionLogSpec",
    "EgressRuleSpec",
    "EnvoySpec",
    "IssuerSpec",
    "ListenSpec",
    "RotateSpec",
    "SidecarConfig",
    "TaskSpec",
]

Seconds = Annotated[float, BeforeValidator(parse_duration)]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2 token
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HOST = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
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


class EgressRuleSpec(_Model):
    """One outbound call pattern a task allows.

    ``paths`` syntax: ``/exact/path`` matches only that path; ``/prefix/*`` matches every path
    below ``/prefix/`` (not ``/prefix`` itself, nor ``/prefixes``); ``*`` matches any path. Paths are
    compared after normalization (decoded once, dot segments removed, slashes merged); the query
    string is never part of the match.
    """

    name: str | None = Field(default=None, max_length=128)
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    methods: list[str] = Field(min_length=1)
    paths: list[str] = Field(min_length=1)
    audience: str | None = None
    scope: str | None = None
    max_calls: int | None = Field(default=None, ge=0)
    token: bool = True
    credential: CredentialSpec | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        host = value.lower()
        if host.endswith("."):
            host = host[:-1]
        if not _HOST.match(host) or len(host) > 253:
            raise ValueError("must be a DNS name or '*.' followed by a DNS suffix, e.g. '*.example.com'")
        return host

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

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in '"\\') or "  " in value):
            raise ValueError("scope is a space-separated list of scope tokens (RFC 6749 §3.3)")
        return value

    @model_validator(mode="after")
    def _token_vs_credential(self) -> EgressRuleSpec:
        if self.token and self.credential is not None and self.credential.header == "authorization":
            raise ValueError("credential.header 'authorization' needs 'token: false' (the token goes there)")
        return self


class TaskSpec(_Model):
    """A declared task: who works, for whom, why, until when, and which calls it may make.

    Validity: ``not_before`` (default: at once) and exactly one of ``expires_at`` (an absolute
    RFC 3339 time with offset) or ``ttl`` (a duration counted from ``not_before``, or, without it,
    from the moment this sidecar first loaded the task; a reload does not extend it).
    """

    id: str
    agent: Annotated[str, BeforeValidator(_spiffe_id)]
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
            raise ValueError("task id: 1-128 characters of A-Z a-z 0-9 . _ : - starting with a letter or digit")
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


class IssuerSpec(_Model):
    """The token issuer: who signs task-scoped access tokens (RFC 9068) and with which key."""

    url: str = Field(min_length=1)
    signing_key: Path
    next_signing_key: Path | None = None
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    max_token_ttl: Seconds = 300.0
    refresh_ahead: float = Field(default=0.25, gt=0, lt=1)
    mint_per_call: bool = False

    @field_validator("max_token_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("max_token_ttl must be between 1s and 24h")
        return value


class ListenSpec(_Model):
    """Where the sidecar listens: ``host:port`` or ``unix:/path`` for the gRPC ext_authz service."""

    authz: str = "127.0.0.1:9191"
    admin: str = "127.0.0.1:9902"

    @field_validator("authz", "admin")
    @classmethod
    def _addr(cls, value: str) -> str:
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


class SidecarConfig(_Model):
    """The whole ``sidecar.yaml``."""

    agent: Annotated[str, BeforeValidator(_spiffe_id)]
    issuer: IssuerSpec
    listen: ListenSpec = ListenSpec()
    envoy: EnvoySpec = EnvoySpec()
    decision_log: DecisionLogSpec = DecisionLogSpec()
    dry_run: bool = False
    tasks: list[TaskSpec] = Field(default_factory=list)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        for task in tasks:
            if task.id in seen:
                raise ValueError(f"duplicate task id {task.id!r}")
            seen.add(task.id)
        return tasks
