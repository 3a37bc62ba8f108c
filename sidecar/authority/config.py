"""The schema of ``authority.yaml`` (``agent-authz authority --config``), as pydantic models.

Like ``sidecar.yaml``: frozen models, unknown keys are errors, each field's docstring is its
description (``docs/reference/authority-config.md`` is generated from them), relative paths resolve
against the file's directory, durations are seconds or strings such as ``5s``, ``10m``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sidecar.config.loader import MAX_CONFIG_BYTES, format_loc, read_limited
from sidecar.config.schema import DecisionLogSpec, RootIssuerSpec, Seconds
from sidecar.errors import ConfigError, SpiffeIdError
from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = [
    "AuthorityConfig",
    "AuthorityGrantsSpec",
    "AuthorityListenSpec",
    "AuthorityTlsSpec",
    "FeedSpec",
    "JwksSpec",
    "KeysSpec",
    "KubernetesSpec",
    "RevocationStoreSpec",
    "TrustSpec",
    "load_authority_config",
    "resolve",
]

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CONFIGMAP = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class Model(BaseModel):
    """Frozen, unknown keys forbidden, field docstrings as descriptions (as ``sidecar.yaml``'s models)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where a pod's ServiceAccount token, CA and namespace are mounted."""


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port")
    return value


class AuthorityListenSpec(Model):
    """The two HTTPS listeners."""

    public: str = "0.0.0.0:8443"
    """``host:port`` of the public listener (server TLS only): OpenID discovery and JWKS per namespace,
    root-signed revocations, ``/healthz``, ``/readyz``, ``/metrics``."""
    feed: str = "0.0.0.0:8444"
    """``host:port`` of the feed listener: mutual TLS, a client X.509-SVID of the trust domain required
    (the revocation feed, key announcements, sidecars' revocations)."""

    @field_validator("public", "feed")
    @classmethod
    def _addr(cls, value: str) -> str:
        return _address(value)


class AuthorityTlsSpec(Model):
    """The serving certificate of both listeners (the chart's generated, cert-manager's or your
    Secret); the files are watched and a renewed certificate is served without restart."""

    cert: Path
    """PEM certificate chain, leaf first, for the authority's Service DNS names."""
    key: Path
    """Its PEM private key."""


class TrustSpec(Model):
    """Whose X.509-SVIDs the feed listener accepts, and the bundles that verify them and signed grants."""

    trust_domain: str
    """The cluster's SPIFFE trust domain: feed clients must have an SVID of it."""
    bundles: dict[str, Path] = Field(min_length=1)
    """Trust domain → PEM file of its X.509 authorities (the SPIRE bundle); the local trust domain's
    verifies clients, all of them verify ``x5c`` signatures of grants and revocation lists. Watched."""
    spiffe_id_template: str = "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
    """How a workload's SPIFFE ID names its namespace (the chart's ``identity.spiffeIdTemplate``): a
    feed client may announce keys for, and is served, only the namespace its ID names."""

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        try:
            parse_spiffe_id(f"spiffe://{value}", require_path=False)
        except SpiffeIdError as exc:
            raise ValueError(f"{value!r} is not a trust domain name ({exc})") from None
        return value

    @field_validator("spiffe_id_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if "{namespace}" not in value or not value.startswith("spiffe://"):
            raise ValueError("the template must start with spiffe:// and contain {namespace}")
        return value

    @model_validator(mode="after")
    def _local_bundle(self) -> TrustSpec:
        if self.trust_domain not in self.bundles:
            raise ValueError(f"bundles needs an entry for the trust domain {self.trust_domain!r}")
        return self

    def namespace_pattern(self) -> re.Pattern[str]:
        """A regex whose group ``namespace`` is a SPIFFE ID's namespace (per ``spiffe_id_template``)."""
        pattern = re.escape(self.spiffe_id_template)
        pattern = pattern.replace(re.escape("{trust_domain}"), re.escape(self.trust_domain))
        pattern = pattern.replace(re.escape("{namespace}"), r"(?P<namespace>[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)")
        pattern = re.sub(r"\\\{[a-z_]+\\\}", r"[^/]+", pattern)
        return re.compile(f"^{pattern}$")


class KubernetesSpec(Model):
    """How the authority reaches the Kubernetes API (in a pod: the defaults) and its two ConfigMaps."""

    api_server: str | None = None
    """``https://host:port`` of the API server; default ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``."""
    token_file: Path = SERVICE_ACCOUNT_DIR / "token"
    """The ServiceAccount token (re-read before each request: projected tokens rotate)."""
    ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt"
    """The CA bundle that verifies the API server."""
    namespace: str | None = None
    """Where the ConfigMaps are; default: the pod's namespace (``namespace`` next to the token)."""
    revocations_configmap: str
    """The ConfigMap holding the revocations (``revocations.json``; and ``operator``, one task id per
    line, that operators edit)."""
    keys_configmap: str
    """The ConfigMap holding the announced public keys (``<namespace>.json`` each)."""
    request_timeout: Seconds = 10.0
    """Timeout of one API request (a watch is not one: it runs until ``watch_timeout``)."""
    watch_timeout: Seconds = 300.0
    """``timeoutSeconds`` of each watch; the authority then resumes from the last resourceVersion."""

    @field_validator("revocations_configmap", "keys_configmap")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CONFIGMAP.match(value):
            raise ValueError("not a ConfigMap name (RFC 1123 subdomain)")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not _NAMESPACE.match(value):
            raise ValueError("not a namespace name (RFC 1123 label)")
        return value

    def server_url(self) -> str:
        """The API server URL (from the environment in a pod).

        Raises:
            ValueError: neither ``api_server`` nor ``KUBERNETES_SERVICE_HOST`` is set.
        """
        if self.api_server is not None:
            return self.api_server.rstrip("/")
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("set kubernetes.api_server (KUBERNETES_SERVICE_HOST is not set)")
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class AuthorityGrantsSpec(Model):
    """Who may revoke anything (root issuers) and how deep delegation chains may be - as on the sidecars."""

    root_issuers: list[RootIssuerSpec] = Field(default_factory=list)
    """Root task issuers (JWKS files or SPIFFE IDs): their revocation lists revoke any task. The same
    list as the sidecars' ``grants.root_issuers``."""
    max_depth: int = Field(default=3, ge=0, le=16)
    """Longest delegation chain of a grant presented with a revocation."""


class FeedSpec(Model):
    """The Server-Sent Events feed."""

    heartbeat: Seconds = 5.0
    """Seconds between heartbeat events (clients count a feed without one for ``max_staleness`` as stale)."""
    max_clients: int = Field(default=10_000, ge=1)
    """Streams served at once; more are answered 503."""

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat(cls, value: float) -> float:
        if not 0.05 <= value <= 60:
            raise ValueError("heartbeat must be between 50ms and 60s")
        return value


class JwksSpec(Model):
    """How verifiers may cache the JWKS and discovery documents."""

    max_age: Seconds = 300.0
    """``Cache-Control: max-age`` of the JWKS (keep it below the lead time of a key announced as next)."""


class KeysSpec(Model):
    """How long announced keys stay published."""

    announce_ttl: Seconds = 3600.0
    """A key announced as current or next stays in the JWKS this long after its last announcement
    (sidecars re-announce on every feed connection and every ``revocation_feed.announce_interval``)."""


class RevocationStoreSpec(Model):
    """How revocations are kept in the ConfigMap."""

    prune_after: Seconds = 600.0
    """An entry whose grant has expired is dropped this long after the expiry (an expired grant needs
    no revocation); entries without a known expiry are kept."""
    max_retries: int = Field(default=20, ge=1, le=1000)
    """Read-modify-write attempts of one change on ``409 Conflict`` before it fails."""


class AuthorityConfig(Model):
    """The whole ``authority.yaml``: every key, section by section.

    Unknown keys are errors; relative paths resolve against the file's directory.
    """

    issuer_base_url: str = Field(min_length=8)
    """``https://…`` base of the issuers: namespace ``N``'s tokens carry ``iss: <base>/ns/N`` and its
    discovery document is at ``<base>/ns/N/.well-known/openid-configuration`` (the chart: the
    authority Service's in-cluster URL)."""
    namespaces: list[str] = Field(min_length=1)
    """The agent namespaces, one signing-key scope each."""
    listen: AuthorityListenSpec = AuthorityListenSpec()
    """The two listeners."""
    tls: AuthorityTlsSpec
    """The serving certificate."""
    trust: TrustSpec
    """Feed clients' trust domain and bundles."""
    kubernetes: KubernetesSpec
    """The Kubernetes API and the ConfigMaps."""
    grants: AuthorityGrantsSpec = AuthorityGrantsSpec()
    """Root issuers and chain depth."""
    feed: FeedSpec = FeedSpec()
    """The feed."""
    jwks: JwksSpec = JwksSpec()
    """Cache headers."""
    keys: KeysSpec = KeysSpec()
    """Announced keys."""
    revocations: RevocationStoreSpec = RevocationStoreSpec()
    """The revocation store."""
    decision_log: DecisionLogSpec = DecisionLogSpec()
    """Where the authority's hash-chained records go: each revocation accepted or refused and each
    key announced or refused (``agent-authz logs verify`` checks the chain)."""

    @field_validator("issuer_base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        if not value.startswith("https://") or "?" in value or "#" in value:
            raise ValueError("issuer_base_url must be an https:// URL without query or fragment")
        return value.rstrip("/")

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for namespace in value:
            if not _NAMESPACE.match(namespace):
                raise ValueError(f"{namespace!r} is not a namespace name (RFC 1123 label)")
        if len(set(value)) != len(value):
            raise ValueError("namespaces must be unique")
        return value


def resolve(source: Path, path: Path) -> Path:
    """``path`` relative to the directory of ``source`` (absolute paths unchanged)."""
    return path if path.is_absolute() else source.parent / path


def load_authority_config(path: Path) -> AuthorityConfig:
    """Read and validate ``authority.yaml``.

    Raises:
        ConfigError: unreadable, not YAML, or invalid (the message names the field).
    """
    try:
        raw = read_limited(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"invalid YAML: {exc}") from None
    try:
        return AuthorityConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(str(path), format_loc(first["loc"]), first["msg"]) from None
