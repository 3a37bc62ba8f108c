"""The injector's settings file (``injector.yaml``, rendered by the Helm chart from its values).

The sidecar configuration that injected pods run (``sidecar.yaml``, the same content as the
ConfigMap the chart creates in every agent namespace) is loaded beside it: the webhook takes the
ports the iptables step must name from it (``envoy.outbound_port``, ``envoy.ingress_port``,
``envoy.inbound_redirect``, ``envoy.ipv6``, ``listen.health``) and the credential names task
annotations may refer to, and refuses to start when it disagrees with the pod layout
(:mod:`sidecar.inject.layout`). Every model is frozen and forbids unknown keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sidecar.config.loader import LoadedConfig, format_loc, load_config
from sidecar.config.schema import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.inject import layout
from sidecar.inject.authors import GrantTrust, Requester
from sidecar.redirect.rules import RedirectError, parse_cidrs

__all__ = [
    "ContainerSettings",
    "CredentialSecret",
    "EnvoyContainerSettings",
    "GrantTrustFiles",
    "InjectorConfig",
    "InjectorSettings",
    "Resources",
    "TaskAuthors",
    "WorkloadApiVolume",
    "build_injector",
    "check_layout",
    "load_injector",
]

_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_MAX_ID = 2**31 - 1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Resources(_Model):
    """Kubernetes ``resources`` of one injected container (``cpu``/``memory``/``ephemeral-storage`` quantities)."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, str]) -> dict[str, str]:
        for name, quantity in value.items():
            if name not in ("cpu", "memory", "ephemeral-storage"):
                raise ValueError(f"{name!r}: expected cpu, memory or ephemeral-storage")
            if not _QUANTITY.match(str(quantity)):
                raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity (e.g. 100m, 64Mi)")
        return value


class ContainerSettings(_Model):
    """Settings of one injected container."""

    resources: Resources = Resources()


class EnvoyContainerSettings(ContainerSettings):
    """Envoy's container: worker threads (``--concurrency``) and log level."""

    concurrency: int = Field(default=2, ge=1, le=64)
    log_level: Literal["info", "warning", "error", "critical", "off"] = "warning"
    """Not ``debug`` or ``trace``: Envoy prints request headers (tokens, API keys) there
    (:data:`~sidecar.bootstrap.launch.ENVOY_LOG_LEVELS`)."""


class SidecarContainerSettings(ContainerSettings):
    """The authz sidecar's container: operational log level (decision records are not affected)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"


class WorkloadApiVolume(_Model):
    """How the SPIRE agent's Workload API socket reaches the pod (mounted at ``/spiffe-workload-api``).

    ``csi``: the SPIFFE CSI driver (``driver``, default ``csi.spiffe.io``) - no hostPath in agent pods.
    ``hostPath``: the node directory ``host_path`` holding the socket (a DaemonSet-managed path).
    """

    mode: Literal["csi", "hostPath"] = "csi"
    driver: str = "csi.spiffe.io"
    host_path: str = "/run/spire/agent-sockets"

    @field_validator("host_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\n" in value:
            raise ValueError("an absolute node path")
        return value


class TaskAuthors(_Model):
    """Who may declare an unsigned task (:mod:`sidecar.inject.authors`); everyone else needs a signed grant.

    Attributes:
        users: usernames as the API server authenticates them (``userInfo.username``).
        groups: groups (``userInfo.groups``); default ``system:masters`` (cluster administrators,
            who could change the webhook anyway).
        service_accounts: ``namespace/name`` of ServiceAccounts (e.g. the deploy pipeline's).
    """

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=lambda: ["system:masters"])
    service_accounts: list[str] = Field(default_factory=list)

    @field_validator("service_accounts")
    @classmethod
    def _service_accounts(cls, value: list[str]) -> list[str]:
        for item in value:
            namespace, sep, name = item.partition("/")
            if not sep or not _DNS_LABEL.match(namespace) or not _DNS_SUBDOMAIN.match(name):
                raise ValueError(f"{item!r}: expected namespace/name of a ServiceAccount")
        return value

    def includes(self, requester: Requester) -> bool:
        """Whether ``requester`` is a task author (by username, group or ServiceAccount)."""
        if not requester.username:
            return False
        return (
            requester.username in self.users
            or bool(requester.groups & set(self.groups))
            or (requester.service_account is not None and requester.service_account in self.service_accounts)
        )


class CredentialSecret(_Model):
    """A credential whose key is in a Kubernetes Secret of the agent namespace (chart:
    ``sidecar.credentials``): mounted into the sidecar container only, at
    ``/etc/agent-authz/credentials/<name>/<key>``, and the pod's own containers may not reach the Secret.
    """

    name: str
    """The credential's name in ``sidecar.yaml``'s ``credentials``."""
    secret_name: str
    """The Secret (in the pod's namespace)."""
    key: str
    """Its key holding the API key."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9._-]{1,64}$", value):
            raise ValueError(f"credential name {value!r}: 1-64 characters of a-z 0-9 . _ -")
        return value

    @field_validator("secret_name")
    @classmethod
    def _secret(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"{value!r} is not a Secret name (DNS subdomain)")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not re.match(r"^[-._a-zA-Z0-9]{1,253}$", value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a Secret key")
        return value

    @property
    def file(self) -> Path:
        """Where the sidecar reads it."""
        return Path(layout.CREDENTIALS_DIR) / self.name / self.key


class GrantTrustFiles(_Model):
    """Where the webhook reads what verifies grants sent by non-authors (chart: the ConfigMaps of
    ``authority.trustBundle`` and ``authority.rootIssuers``, mounted read-only). Relative paths are
    resolved against the settings file's directory."""

    bundle: Path | None = None
    """PEM X.509 authorities of ``trust_domain`` (delegated grants are signed with X.509-SVIDs)."""
    root_issuers: Path | None = None
    """JWKS of the root issuers (root grants are signed with their keys)."""


class InjectorSettings(_Model):
    """``injector.yaml``.

    Attributes:
        image: the agent-authz image of all three injected containers (``repo:tag`` or ``repo@sha256:…``).
        image_pull_policy: Kubernetes ``imagePullPolicy``.
        proxy_uid / proxy_gid: UID and GID of Envoy and the sidecar; their traffic is never
            redirected, so no other container of the pod may run with them.
        sidecar_config: path of the ``sidecar.yaml`` injected pods run (mounted in the webhook pod).
        config_map: name of the ConfigMap holding ``sidecar.yaml`` in every agent namespace.
        signing_key_secret: name of the Secret holding ``signing.pem`` in every agent namespace.
        namespaces: namespaces provisioned with that ConfigMap and Secret; a pod elsewhere is
            refused with a message saying so (empty: not checked, the operator provisions them).
        trust_domain / spiffe_id_template: the SPIFFE ID SPIRE gives a pod, e.g.
            ``spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`` (SPIRE controller
            manager's default); the ``agent`` a task annotation defaults to and must equal. Empty
            template: not checked (a warning instead).
        workload_api: the SPIRE agent socket volume.
        exclude_inbound_ports / exclude_outbound_cidrs / exclude_outbound_ports / allow_non_tcp:
            passed to ``agent-authz iptables``. The health port, the pod's probe ports and its HTTP
            lifecycle hook ports are always excluded from inbound interception (kubelet has no SVID).
        allow_opt_out: whether ``agent-authz.io/inject: "false"`` is honoured (else refused).
        require_run_as_user: refuse containers without an explicit ``runAsUser`` (an image's own
            ``USER`` cannot be seen at admission and might be the proxy UID).
        harden_containers: a container that may run as root and keeps ``SETUID``, ``SETGID`` or
            ``NET_RAW`` gets them added to its ``capabilities.drop`` (with a warning) instead of the
            pod being refused (:mod:`sidecar.inject.escapes`).
        logs_size_limit: ``sizeLimit`` of the decision-log emptyDir.
        state_size_limit: ``sizeLimit`` of the durable-state emptyDir (disk-backed: it survives
            container restarts, and a node reboot that keeps the pod).
        init / sidecar / envoy: per-container settings.
        task_authors: who may declare unsigned tasks (:mod:`sidecar.inject.authors`).
        grant_trust: the files that verify grants sent by anyone else.
        credentials: credentials mounted from Secrets (their names must match ``sidecar.yaml``).
    """

    image: str = Field(min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    proxy_uid: int = Field(default=1337, ge=1, le=_MAX_ID)
    proxy_gid: int = Field(default=1337, ge=1, le=_MAX_ID)
    sidecar_config: Path
    config_map: str = "agent-authz-sidecar"
    signing_key_secret: str = "agent-authz-signing-key"  # noqa: S105 - a Secret's name
    namespaces: list[str] = Field(default_factory=list)
    trust_domain: str = "example.org"
    spiffe_id_template: str = "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
    workload_api: WorkloadApiVolume = WorkloadApiVolume()
    exclude_inbound_ports: list[int] = Field(default_factory=list)
    exclude_outbound_cidrs: list[str] = Field(default_factory=list)
    exclude_outbound_ports: list[int] = Field(default_factory=list)
    allow_non_tcp: bool = False
    allow_opt_out: bool = True
    require_run_as_user: bool = False
    harden_containers: bool = False
    logs_size_limit: str = "256Mi"
    state_size_limit: str = "64Mi"
    init: ContainerSettings = ContainerSettings()
    sidecar: SidecarContainerSettings = SidecarContainerSettings()
    envoy: EnvoyContainerSettings = EnvoyContainerSettings()
    task_authors: TaskAuthors = TaskAuthors()
    grant_trust: GrantTrustFiles = GrantTrustFiles()
    credentials: list[CredentialSecret] = Field(default_factory=list)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError("an image reference has no whitespace")
        return value

    @field_validator("config_map", "signing_key_secret")
    @classmethod
    def _object_name(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes object name (DNS subdomain)")
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _DNS_LABEL.match(name):
                raise ValueError(f"{name!r} is not a namespace name (DNS label)")
        return value

    @field_validator("exclude_inbound_ports", "exclude_outbound_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")
        return value

    @field_validator("exclude_outbound_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        try:
            parse_cidrs(",".join(value))  # the iptables step's own parser: refuse here what it would refuse
        except RedirectError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("logs_size_limit", "state_size_limit")
    @classmethod
    def _size(cls, value: str) -> str:
        if not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity")
        return value

    @field_validator("spiffe_id_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value:
            try:
                value.format(trust_domain="td", namespace="ns", service_account="sa")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"placeholders are {{trust_domain}}, {{namespace}} and {{service_account}} ({exc})"
                ) from None
        return value

    @model_validator(mode="after")
    def _distinct_ids(self) -> InjectorSettings:
        if self.workload_api.mode == "csi" and not self.workload_api.driver:
            raise ValueError("workload_api.driver is required with mode csi")
        names = [c.name for c in self.credentials]
        if len(set(names)) != len(names):
            raise ValueError("credentials: each name once")
        return self

    @property
    def credential_secrets(self) -> frozenset[str]:
        """The Secrets holding credentials: no container of the pod's own may reach them."""
        return frozenset(c.secret_name for c in self.credentials)

    def spiffe_id(self, namespace: str, service_account: str) -> str | None:
        """The SPIFFE ID SPIRE is expected to give a pod (``None`` when no template is set)."""
        if not self.spiffe_id_template:
            return None
        return self.spiffe_id_template.format(
            trust_domain=self.trust_domain, namespace=namespace, service_account=service_account
        )


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """The injector's settings and the sidecar configuration it injects.

    Attributes:
        settings: ``injector.yaml``.
        sidecar: the validated ``sidecar.yaml``.
        outbound_port / inbound_port / inbound / ipv6 / health_port: what the iptables step and
            the probes name, from ``sidecar.yaml``.
        intercept: ``sidecar.yaml`` has an ``intercept`` section: the pod gets the trust volume, and
            its own containers the pod CA and the variables runtimes read.
        proxy_ports: the other TCP ports Envoy and the sidecar listen on (egress listener, admin and
            probe servers), for the iptables step's ``--proxy-ports``.
        grant_trust: verifies the grants non-authors send (``None``: built from ``settings`` by
            :func:`build_injector`).
        dns_port: the sidecar's DNS proxy (``dns.listen``), for the iptables step's ``--dns-port``.
    """

    settings: InjectorSettings
    sidecar: LoadedConfig
    outbound_port: int
    inbound_port: int
    inbound: bool
    ipv6: bool
    health_port: int
    intercept: bool = False
    proxy_ports: tuple[int, ...] = ()
    grant_trust: GrantTrust | None = None
    dns_port: int = 15053


def check_layout(config: SidecarConfig) -> list[str]:
    """Where ``config`` disagrees with the injected pod's layout (:mod:`sidecar.inject.layout`).

    Returns:
        One message per problem (empty when the configuration fits the pod).
    """
    problems = []
    if config.identity is None or config.identity.source != "workload_api":
        problems.append("identity.source must be workload_api (the SPIRE agent socket is what the pod gets)")
    else:
        socket = config.identity.workload_api.socket.removeprefix("unix://")
        if Path(socket).parent != Path(layout.WORKLOAD_API_DIR):
            problems.append(f"identity.workload_api.socket must be in {layout.WORKLOAD_API_DIR}/, got {socket}")
    if str(config.issuer.signing_key) != layout.SIGNING_KEY_FILE:
        problems.append(f"issuer.signing_key must be {layout.SIGNING_KEY_FILE}")
    if config.issuer.next_signing_key is not None and Path(config.issuer.next_signing_key).parent != Path(
        layout.KEYS_DIR
    ):
        problems.append(f"issuer.next_signing_key must be in {layout.KEYS_DIR}/")
    if config.listen.authz != f"unix:{layout.AUTHZ_SOCKET}":
        problems.append(
            f"listen.authz must be unix:{layout.AUTHZ_SOCKET} (the proxy's own directory, shared by Envoy and the "
            "sidecar; on TCP the agent could send its own Check or stream SDS)"
        )
    http_checks = config.listen.authz_http  # when unset it lives beside listen.authz, checked above
    if http_checks is not None and (
        not http_checks.startswith("unix:") or Path(http_checks[5:]).parent != Path(layout.AUTHZ_SOCKET).parent
    ):
        problems.append(
            f"listen.authz_http must be a Unix socket in {Path(layout.AUTHZ_SOCKET).parent}/ (the proxy's own "
            "directory; on TCP the agent could send its own checks)"
        )
    admin_socket = config.envoy.admin_socket
    if admin_socket is None or Path(admin_socket) != Path(layout.ENVOY_ADMIN_SOCKET):
        problems.append(
            f"envoy.admin_socket must be {layout.ENVOY_ADMIN_SOCKET} (on TCP the agent could reach Envoy's admin)"
        )
    if config.listen.health is None or config.listen.health.rpartition(":")[2] in ("", "0"):
        problems.append("listen.health must be set to a fixed port (kubelet probes it)")
    if config.envoy.outbound_port is None:
        problems.append("envoy.outbound_port must be set (the iptables step redirects there)")
    expected = [(Path(layout.TASK_FILE), Path(layout.REVOKED_FILE))]
    if [(spec.path, spec.revoked) for spec in config.task_files] != expected:
        problems.append(f"task_files must be [{{path: {layout.TASK_FILE}, revoked: {layout.REVOKED_FILE}}}]")
    log_path = config.decision_log.path
    if log_path is not None and Path(log_path).parent != Path(layout.LOG_DIR):
        problems.append(f"decision_log.path must be in {layout.LOG_DIR}/")
    if config.state.path is None or Path(config.state.path) != Path(layout.STATE_FILE):
        problems.append(f"state.path must be {layout.STATE_FILE} (the sidecar's own volume; a restart forgets nothing)")
    if config.dns is not None:
        host, _, port = config.dns.listen.rpartition(":")
        if host != "127.0.0.1" or port == "0":
            problems.append("dns.listen must be 127.0.0.1 with a fixed port (the iptables step redirects DNS there)")
    intercept = config.intercept
    if intercept is not None:
        if Path(intercept.state_dir) != Path(layout.INTERCEPT_STATE_DIR):
            problems.append(f"intercept.state_dir must be {layout.INTERCEPT_STATE_DIR} (the sidecar's and Envoy's)")
        if Path(intercept.publish_dir) != Path(layout.TRUST_DIR):
            problems.append(f"intercept.publish_dir must be {layout.TRUST_DIR} (the agent's trust volume)")
    return problems


def load_injector(path: str | Path) -> InjectorConfig:
    """Read ``injector.yaml`` and the ``sidecar.yaml`` it names.

    Raises:
        ConfigError: either file is unreadable or invalid, or ``sidecar.yaml`` does not fit the
            pod layout (the message lists every disagreement).
    """
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_bytes())
    except OSError as exc:
        raise ConfigError(str(source), "", f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(source), "", f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(source), "", "the top level must be a mapping")
    try:
        settings = InjectorSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(str(source), format_loc(first["loc"]), first["msg"].removeprefix("Value error, ")) from None
    sidecar_path = (
        settings.sidecar_config if settings.sidecar_config.is_absolute() else source.parent / settings.sidecar_config
    )
    trust = settings.grant_trust
    resolved = GrantTrustFiles(
        bundle=None if trust.bundle is None else source.parent / trust.bundle,
        root_issuers=None if trust.root_issuers is None else source.parent / trust.root_issuers,
    )
    settings = settings.model_copy(update={"grant_trust": resolved})
    return build_injector(settings, load_config(sidecar_path), file=str(source))


def build_injector(settings: InjectorSettings, loaded: LoadedConfig, *, file: str) -> InjectorConfig:
    """The :class:`InjectorConfig` of validated settings and the ``sidecar.yaml`` they name (no I/O:
    tests build it in memory).

    Args:
        settings: the validated ``injector.yaml``.
        loaded: the validated ``sidecar.yaml``.
        file: the settings file, for errors.

    Raises:
        ConfigError: ``sidecar.yaml`` does not fit the pod layout (every disagreement listed), or
            the proxy runs as root.
    """
    problems = check_layout(loaded.settings)
    for credential in settings.credentials:
        configured = loaded.settings.credentials.get(credential.name)
        if configured is None or Path(configured.file) != credential.file:
            problems.append(
                f"credentials.{credential.name}.file must be {credential.file} (the Secret {credential.secret_name} "
                "is mounted there, in the sidecar container only)"
            )
    if loaded.settings.dns is None and 53 not in settings.exclude_outbound_ports:
        problems.append(
            "dns must be set: the iptables step redirects the agent's DNS to the sidecar's DNS proxy "
            "(or exclude port 53 in exclude_outbound_ports, which leaves DNS an open channel)"
        )
    if problems:
        raise ConfigError(str(loaded.source), "", "does not fit the injected pod: " + "; ".join(problems))
    sidecar = loaded.settings
    assert sidecar.envoy.outbound_port is not None and sidecar.listen.health is not None
    if settings.proxy_uid == 0 or settings.proxy_gid == 0:
        raise ConfigError(file, "proxy_uid", "the proxy runs as non-root")
    health_port = int(sidecar.listen.health.rpartition(":")[2])
    ports = {health_port, sidecar.envoy.egress_port}
    if not sidecar.listen.admin.startswith("unix:"):
        ports.add(int(sidecar.listen.admin.rpartition(":")[2]))
    ports -= {0, sidecar.envoy.outbound_port, sidecar.envoy.ingress_port}
    return InjectorConfig(
        settings=settings,
        sidecar=loaded,
        outbound_port=sidecar.envoy.outbound_port,
        inbound_port=sidecar.envoy.ingress_port,
        inbound=sidecar.envoy.inbound_redirect,
        ipv6=sidecar.envoy.ipv6,
        health_port=health_port,
        intercept=sidecar.intercept is not None,
        proxy_ports=tuple(sorted(ports)),
        grant_trust=GrantTrust(
            settings.trust_domain,
            settings.grant_trust.bundle,
            settings.grant_trust.root_issuers,
            max_depth=sidecar.grants.max_depth,
        ),
        dns_port=int(sidecar.dns.listen.rpartition(":")[2]) if sidecar.dns is not None else 15053,
    )
