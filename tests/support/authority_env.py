"""A cluster authority environment: the Kubernetes API double, authority replicas as processes, sidecars.

Everything the chart would give an authority in a cluster, built from what the chart renders:
``helm template`` renders the authority's Role (fed to the API double as the ServiceAccount's RBAC,
so a missing verb fails here), its ConfigMaps (seeded into the double) and its ``authority.yaml``
(used as the base of each replica's config, with paths pointing at the files made here). The
Kubernetes API server itself is a double (``sidecar/simulation/kube_api.py``): no API server can run
here. Each replica is a real ``agent-authz authority`` process; sidecars are real ``agent-authz
serve`` processes with X.509-SVIDs from a dev CA.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.harness import AuthorityProcess, SidecarProcess, wait_until
from sidecar.identity.devca import DevCA
from sidecar.simulation.jwt_upstream import jwt_authn_bootstrap as stock_jwt_authn
from sidecar.simulation.kube_api import KubeApiDouble, Subject, rules_from_role
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key
from tests.support.k8s import find, helm_template

__all__ = [
    "BASE_URL",
    "NAMESPACES",
    "RELEASE_NS",
    "SERVICE",
    "TD",
    "AuthorityCluster",
    "bearer",
    "check",
    "free_port",
    "https_json",
    "jwt_authn_bootstrap",
    "metric_value",
    "reason",
    "serving_pair",
    "task_api",
]

TD = "cluster.test"
RELEASE = "aa"
RELEASE_NS = "agent-authz"
NAMESPACES = ("agents", "research")
SERVICE = f"{RELEASE}-agent-authz-authority"
BASE_URL = f"https://{SERVICE}.{RELEASE_NS}.svc"
PEM = serialization.Encoding.PEM


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for a replica that must come back on the same port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serving_pair(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and the authority's serving certificate (the Service's DNS names and 127.0.0.1)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{SERVICE}-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName(n) for n in (SERVICE, f"{SERVICE}.{RELEASE_NS}", f"{SERVICE}.{RELEASE_NS}.svc", "localhost")
    ]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{SERVICE}.{RELEASE_NS}.svc")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(PEM))
    (directory / "tls.crt").write_bytes(leaf.public_bytes(PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "ca.crt", directory / "tls.crt", directory / "tls.key"


def https_json(
    url: str,
    *,
    ca_file: Path,
    method: str = "GET",
    body: Any = None,
    cert: tuple[Path, Path] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any, dict[str, str]]:
    """One HTTPS request (verified against ``ca_file``, optionally with a client certificate);
    returns ``(status, JSON body or None, headers)``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, dict(response.headers)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return err.code, parsed, dict(err.headers)


def check(sock: Path, host: str, path: str, method: str = "GET") -> Any:
    """One ext_authz Check on a sidecar's Unix socket, as Envoy's HTTP filter sends it."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    from tests.support.envoy_authz import check_request

    message = external_auth_pb2.CheckRequest.FromString(check_request(host=host, path=path, method=method))
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        call = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=None,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        return call(message.SerializeToString(), timeout=5)


def reason(response: Any) -> str:
    """The reason of a CheckResponse (``allowed`` for an OK)."""
    if response.status.code == 0:
        return "allowed"
    return {h.header.key: h.header.value for h in response.denied_response.headers}["x-agent-authz-reason"]


def bearer(response: Any) -> str:
    """The token an allowed CheckResponse sets in ``Authorization``."""
    headers = {h.header.key: h.header.value for h in response.ok_response.headers}
    return headers["authorization"].removeprefix("Bearer ")


def task_api(sidecar: SidecarProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A call to a sidecar's local task API."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(sidecar.admin_url + path, data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in an exposition ``text`` (``None`` when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return None


class AuthorityCluster:
    """The API double, N authority replicas and helpers to make sidecars for them.

    Args:
        root: a directory of its own.
        replicas: authority processes to run.
        heartbeat: the feed's heartbeat (seconds).
        history: watch events the double keeps.

    Attributes:
        ca: the trust domain's dev CA (SVIDs of sidecars and clients).
        tls_ca: the CA of the authority's serving certificate.
        kube: the API double.
        authorities: the replicas.
        issuer_key / issuer_jwks: a root task issuer (its JWKS is the authority's root issuers).
        chart: the rendered chart's authority manifests (``role``, ``config``, ``configmaps``).
    """

    def __init__(self, root: Path, *, replicas: int = 2, heartbeat: float = 0.5, history: int = 1000) -> None:
        self.root = root
        self.ca = DevCA.create(TD)
        self.ca.save(root / "ca")
        self.bundle = root / "ca" / "bundle.pem"
        self.tls_ca, self.tls_cert, self.tls_key = serving_pair(root / "tls")
        pem = generate_private_key_pem()
        (root / "issuer").mkdir(parents=True, exist_ok=True)
        (root / "issuer" / "issuer.key").write_bytes(pem)
        self.issuer = load_signing_key(pem, "ES256", file="issuer", field="")
        self.issuer_key = root / "issuer" / "issuer.key"
        self.issuer_jwks = root / "issuer" / "issuer.jwks.json"
        self.issuer_jwks.write_text(json.dumps({"keys": [self.issuer.public_jwk]}))
        self.chart = self._render_chart()
        token = "authority-sa-token"
        subject = Subject(
            f"system:serviceaccount:{RELEASE_NS}:{SERVICE}", {RELEASE_NS: rules_from_role(self.chart["role"])}
        )
        self.kube = KubeApiDouble(root / "kube", subjects={token: subject}, history=history, bookmark_interval=2.0)
        (root / "kube" / "sa-token").write_text(token)
        for configmap in self.chart["configmaps"]:
            self.kube.seed(copy.deepcopy(configmap))
        self.heartbeat = heartbeat
        self.authorities: list[AuthorityProcess] = []
        self._ports: list[tuple[int, int]] = []
        self._replicas = replicas
        self.sidecars: list[SidecarProcess] = []

    @staticmethod
    def _render_chart() -> dict[str, Any]:
        manifests = helm_template(
            values={"agentNamespaces": list(NAMESPACES), "identity": {"trustDomain": TD}}, namespace=RELEASE_NS
        )
        (role,) = find(manifests, "Role", "-authority")
        (config,) = find(manifests, "ConfigMap", "-authority-config")
        state = [m for m in find(manifests, "ConfigMap") if m["metadata"]["name"].endswith(("-revocations", "-keys"))]
        sidecars = {m["metadata"]["namespace"]: m for m in find(manifests, "ConfigMap", "-sidecar")}
        return {
            "role": role,
            "config": yaml.safe_load(config["data"]["authority.yaml"]),
            "configmaps": state,
            "sidecars": sidecars,
        }

    # -- the authority --------------------------------------------------------------------------------
    def authority_config(self, index: int, **overrides: Any) -> Path:
        """Write replica ``index``'s ``authority.yaml``: the chart's, with this environment's files."""
        config = copy.deepcopy(self.chart["config"])
        public, feed = self._ports[index]
        config["listen"] = {"public": f"127.0.0.1:{public}", "feed": f"127.0.0.1:{feed}"}
        config["tls"] = {"cert": str(self.tls_cert), "key": str(self.tls_key)}
        config["trust"]["bundles"] = {TD: str(self.bundle)}
        config["kubernetes"].update(
            api_server=self.kube.url,
            token_file=str(self.root / "kube" / "sa-token"),
            ca_file=str(self.kube.ca_file),
            namespace=RELEASE_NS,
        )
        config["grants"] = {"root_issuers": [{"jwks": str(self.issuer_jwks)}]}
        config["feed"] = {"heartbeat": self.heartbeat}
        config["decision_log"] = {"path": f"authority-{index}.records.log", "stdout": False}
        config.update(overrides)
        path = self.root / f"authority-{index}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> None:
        """Start the double and the replicas; wait until every replica is ready."""
        self.kube.start()
        for index in range(self._replicas):
            self._ports.append((free_port(), free_port()))
            config = self.authority_config(index)
            self.authorities.append(
                AuthorityProcess(
                    config, ca_file=self.tls_ca, log_dir=self.root, name=f"authority-{index}", env=self._env(index)
                )
            )
        for authority in self.authorities:
            authority.start()
        for authority in self.authorities:
            authority.wait_ready()

    def _env(self, index: int) -> dict[str, str]:
        import os

        return {**os.environ, "HOSTNAME": f"{SERVICE}-{index}"}

    def restart(self, index: int) -> float:
        """Stop replica ``index`` and start it again on the same ports; returns seconds until ready."""
        authority = self.authorities[index]
        authority.stop()
        started = time.monotonic()
        authority.start()
        authority.wait_ready()
        return time.monotonic() - started

    def records(self, index: int) -> list[dict[str, Any]]:
        """The hash-chained records replica ``index`` wrote."""
        path = self.root / f"authority-{index}.records.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def url(self, index: int, listener: str = "public") -> str:
        """``https://127.0.0.1:PORT`` of a replica's listener."""
        public, feed = self._ports[index]
        return f"https://127.0.0.1:{public if listener == 'public' else feed}"

    def issuer_url(self, namespace: str) -> str:
        """The issuer URL of ``namespace``."""
        return f"{BASE_URL}/ns/{namespace}"

    def revocations(self) -> dict[str, Any]:
        """The revocations ConfigMap as stored in the double."""
        found = self.kube.object("", "configmaps", RELEASE_NS, f"{RELEASE}-agent-authz-revocations")
        assert found is not None
        return found

    # -- sidecars -------------------------------------------------------------------------------------
    def svid(self, spiffe_id: str, directory: Path, name: str = "agent") -> tuple[Path, Path]:
        """Issue an X.509-SVID into ``directory``; returns ``(cert, key)``."""
        issued = self.ca.write_svid(spiffe_id, directory, name=name, ttl=dt.timedelta(hours=2))
        return issued.cert, issued.key

    def sidecar_config(
        self,
        state: Path,
        spiffe_id: str,
        namespace: str,
        sock_dir: Path,
        *,
        authority: int = 0,
        grants: Sequence[str] = (),
        tasks: Sequence[dict[str, Any]] = (),
        feed: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write a sidecar's keys, SVID and ``sidecar.yaml`` (the chart's for ``namespace``, with this
        environment's files, and ``extra`` top-level sections) into ``state``; returns the config path."""
        state.mkdir(parents=True, exist_ok=True)
        (state / "keys").mkdir(exist_ok=True)
        key_file = state / "keys" / "signing.pem"
        shared = self.root / "ns-keys" / f"{namespace}.pem"  # one key per namespace, as the chart makes
        if not shared.exists():
            shared.parent.mkdir(parents=True, exist_ok=True)
            shared.write_bytes(generate_private_key_pem())
        key_file.write_bytes(shared.read_bytes())
        self.svid(spiffe_id, state / "svid")
        for index, token in enumerate(grants):
            (state / f"grant{index}.jwt").write_text(token + "\n")
        chart = yaml.safe_load(self.chart["sidecars"][namespace]["data"]["sidecar.yaml"])
        config: dict[str, Any] = {
            "identity": {
                "source": "files",
                "files": {"svid": "svid/agent.pem", "key": "svid/agent.key", "bundles": {TD: str(self.bundle)}},
            },
            "issuer": {**chart["issuer"], "signing_key": "keys/signing.pem"},
            "listen": {"authz": f"unix:{sock_dir / 'authz.sock'}", "admin": "127.0.0.1:0"},
            "envoy": {"egress_port": 0, "admin_port": 0},
            "decision_log": {"path": "decisions.log", "stdout": False},
            "state": {"path": "state/state.db"},
            "grants": {
                "files": [f"grant{i}.jwt" for i in range(len(grants))],
                "root_issuers": [{"jwks": str(self.issuer_jwks)}],
                "revocation_feed": {
                    **chart["grants"]["revocation_feed"],
                    "url": self.url(authority, "feed"),
                    "ca": str(self.tls_ca),
                    **(feed or {}),
                },
            },
            "tasks": list(tasks),
            **(extra or {}),
        }
        path = state / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_sidecar(self, config: Path, name: str) -> SidecarProcess:
        """Start a sidecar and wait until it is ready (its feed may still be connecting)."""
        sidecar = SidecarProcess(config, log_dir=config.parent, name=name)
        self.sidecars.append(sidecar)
        sidecar.start()
        sidecar.wait_ready()
        return sidecar

    def stop(self) -> None:
        """Stop every sidecar and replica, then the double."""
        for sidecar in self.sidecars:
            sidecar.stop()
        for authority in self.authorities:
            authority.stop()
        self.kube.stop()


@contextmanager
def authority_cluster(root: Path, **options: Any) -> Iterator[AuthorityCluster]:
    """An :class:`AuthorityCluster`, started, stopped (and reaped) afterwards."""
    cluster = AuthorityCluster(root, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def wait_feed_connected(sidecar: SidecarProcess, timeout: float = 15.0) -> None:
    """Wait until a sidecar's feed has delivered its snapshot (its ``/metrics`` says connected)."""
    from sidecar.harness import http_get

    def connected() -> bool:
        status, body = http_get(sidecar.admin_url + "/metrics")
        return status == 200 and metric_value(body.decode(), "agent_authz_revocation_feed_connected") == 1.0

    wait_until(connected, timeout=timeout, what=f"{sidecar.name} revocation feed")


def jwt_authn_bootstrap(*, issuer: str, audience: str, jwks_port: int, ca_file: Path) -> dict[str, Any]:
    """An upstream's stock Envoy on ``127.0.0.1``: every request must carry a JWT of ``issuer`` for
    ``audience``, verified by the ``jwt_authn`` filter against the authority's JWKS (``remote_jwks``
    over HTTPS to the Service name on ``127.0.0.1:jwks_port``, verified against ``ca_file``); allowed
    requests get a direct 200 ``ok`` (:func:`sidecar.simulation.jwt_upstream.jwt_authn_bootstrap`)."""
    return stock_jwt_authn(
        issuer=issuer,
        audience=audience,
        jwks_host=f"{SERVICE}.{RELEASE_NS}.svc",
        jwks_address="127.0.0.1",
        jwks_port=jwks_port,
        ca_file=ca_file,
    )
