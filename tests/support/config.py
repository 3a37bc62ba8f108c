"""Config helpers of the tests: the test agent's IDs, keys, task declarations and ``sidecar.yaml`` files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidecar.identity.devca import DevCA
from sidecar.tokens.keys import generate_private_key_pem

__all__ = [
    "AGENT",
    "API_AUDIENCE",
    "API_HOST",
    "ISSUER",
    "OTHER_AGENT",
    "PLANNER",
    "add_file_identity",
    "base_config",
    "task",
    "write_config",
    "write_keys",
]

AGENT = "spiffe://test.example/ns/agents/sa/worker"
PLANNER = "spiffe://test.example/ns/orchestration/sa/planner"
OTHER_AGENT = "spiffe://test.example/ns/agents/sa/other"
ISSUER = "https://issuer.test.example"
API_HOST = "api.internal"
API_AUDIENCE = "https://api.internal"


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
        "envoy": {
            "egress_port": 0,
            "admin_socket": str(sock_dir / "envoy-admin.sock"),
            "destinations": destinations or {},
        },
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
