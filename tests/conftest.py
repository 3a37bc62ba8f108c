"""Shared fixtures: keys, configs, the sample upstream and a real sidecar + Envoy stack."""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from sidecar.demo.tls_client import TlsReply, mtls_request  # noqa: F401  (re-exported for tests)
from sidecar.demo.upstream import SampleUpstream, TokenCheck
from sidecar.identity.devca import DevCA
from sidecar.procs import AuthzStack
from sidecar.tokens.keys import generate_private_key_pem

AGENT = "spiffe://test.example/ns/agents/sa/worker"
PLANNER = "spiffe://test.example/ns/orchestration/sa/planner"
OTHER_AGENT = "spiffe://test.example/ns/agents/sa/other"
ISSUER = "https://issuer.test.example"
API_HOST = "api.internal"
API_AUDIENCE = "https://api.internal"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts with structlog's default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def write_keys(state: Path, algorithm: str = "ES256") -> None:
    """Mint a fresh signing key (and next key) under ``state/keys``; overwrites existing ones."""
    keys = state / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "signing.pem").write_bytes(generate_private_key_pem(algorithm))  # type: ignore[arg-type]
    (keys / "next.pem").write_bytes(generate_private_key_pem(algorithm))  # type: ignore[arg-type]


def task(
    task_id: str = "t1", *, agent: str = AGENT, egress: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    """A task declaration with sensible defaults."""
    body: dict[str, Any] = {
        "id": task_id,
        "agent": agent,
        "purpose": "test task",
        "ttl": "1h",
        "egress": egress
        if egress is not None
        else [
            {
                "name": "api-read",
                "host": API_HOST,
                "methods": ["GET"],
                "paths": ["/v1/items/*"],
                "audience": API_AUDIENCE,
                "scope": "items:read",
            }
        ],
    }
    body.update(extra)
    return body


def base_config(
    sock_dir: Path, tasks: list[dict[str, Any]], destinations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A ``sidecar.yaml`` dict using a unix socket and port 0 everywhere."""
    return {
        "agent": AGENT,
        "issuer": {
            "url": ISSUER,
            "signing_key": "keys/signing.pem",
            "next_signing_key": "keys/next.pem",
            "max_token_ttl": "5m",
        },
        "listen": {"authz": f"unix:{sock_dir / 'authz.sock'}", "admin": "127.0.0.1:0"},
        "envoy": {"egress_port": 0, "admin_port": 0, "destinations": destinations or {}},
        "decision_log": {"path": "decisions.log", "stdout": False},
        "tasks": tasks,
    }


def write_config(state: Path, config: dict[str, Any], name: str = "sidecar.yaml") -> Path:
    """Write ``config`` as YAML atomically (rename), as an editor or kubelet would."""
    path = state / name
    tmp = state / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path for unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Reply:
    """An HTTP response as the agent sees it."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-agent-authz-reason")

    @property
    def decision_id(self) -> str | None:
        return self.headers.get("x-agent-authz-decision-id")

    def json(self) -> Any:
        return json.loads(self.body)


def send(port: int, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
    """Send one request to Envoy's egress listener as a forward-proxy client does (absolute-form target).

    ``url`` is sent verbatim, so hostile paths reach Envoy unmodified.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, url, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


@dataclass
class Env:
    """A running sidecar + Envoy + sample upstream for one test (or module)."""

    state: Path
    config_path: Path
    config: dict[str, Any]
    stack: AuthzStack
    upstream: SampleUpstream

    @property
    def port(self) -> int:
        return self.stack.egress_port

    def send(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
        return send(self.port, method, url, headers, body)

    @property
    def admin(self) -> str:
        return self.stack.sidecar.admin_url

    def records(self) -> list[dict[str, Any]]:
        path = self.state / "decisions.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def record(self, decision_id: str | None) -> dict[str, Any]:
        matches = [r for r in self.records() if r["decision_id"] == decision_id]
        assert len(matches) == 1, f"expected one record for {decision_id}, found {len(matches)}"
        return matches[0]

    def rewrite(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        config = copy.deepcopy(self.config)
        mutate(config)
        self.config = config
        write_config(self.state, config)


def add_file_identity(state: Path, config: dict[str, Any], local_app: str | None = None) -> dict[str, DevCA]:
    """Create dev CAs (``test.example`` and the federated ``partner.example``), an SVID for ``AGENT``,
    and point ``config`` at them (``identity.source: files``); with ``local_app``, render an inbound
    listener on 127.0.0.1 port 0 forwarding to it."""
    cas = {"test.example": DevCA.create("test.example"), "partner.example": DevCA.create("partner.example")}
    for td, ca in cas.items():
        ca.save(state / "cas" / td)
    cas["test.example"].write_svid(AGENT, state / "svid", name="agent")
    config["identity"] = {
        "source": "files",
        "files": {
            "svid": "svid/agent.pem",
            "key": "svid/agent.key",
            "bundles": {td: f"cas/{td}/bundle.pem" for td in cas},
            "jwt_bundles": {td: f"cas/{td}/jwt-bundle.json" for td in cas},
        },
    }
    if local_app is not None:
        config["envoy"].update(local_app=local_app, ingress_address="127.0.0.1", ingress_port=0)
    return cas


def start_env(
    state: Path,
    sock_dir: Path,
    tasks: list[dict[str, Any]],
    checks: dict[str, Any] | None = None,
    mutate: Callable[[dict[str, Any], int], None] | None = None,
) -> Env:
    """Start the upstream, write keys and config (``mutate(config, upstream_port)`` may edit it), start the stack."""
    write_keys(state)
    upstream = SampleUpstream(checks if checks is not None else {API_HOST: TokenCheck(API_AUDIENCE, ISSUER)})
    port = upstream.start()
    config = base_config(sock_dir, tasks, {API_HOST: f"127.0.0.1:{port}", "other.internal": f"127.0.0.1:{port}"})
    if mutate is not None:
        mutate(config, port)
    config_path = write_config(state, config)
    stack = AuthzStack(config_path, state)
    try:
        stack.start()
    except BaseException:
        upstream.stop()
        raise
    upstream.jwks_url = stack.sidecar.admin_url + "/.well-known/jwks.json"
    return Env(state, config_path, config, stack, upstream)


@pytest.fixture
def env_factory(tmp_path: Path, short_dir: Path) -> Iterator[Callable[..., Env]]:
    """Start a stack with the given tasks; everything is stopped and reaped after the test."""
    started: list[Env] = []

    def make(
        tasks: list[dict[str, Any]],
        checks: dict[str, Any] | None = None,
        mutate: Callable[[dict[str, Any], int], None] | None = None,
    ) -> Env:
        env = start_env(tmp_path, short_dir, tasks, checks, mutate)
        started.append(env)
        return env

    yield make
    for env in started:
        env.stack.stop()
        env.upstream.stop()
