"""Builds the files of a delegation scenario: a trust domain, a root task issuer, agents with SVIDs."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.config.schema import TaskSpec
from sidecar.grants.issue import sign_root_grant
from sidecar.harness import SidecarProcess
from sidecar.identity.devca import DevCA
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key
from tests.support.config import base_config, write_config, write_keys
from tests.support.envoy_authz import check_request

TD = "test.example"
ORCH = f"spiffe://{TD}/ns/finance/sa/orchestrator"
SUB = f"spiffe://{TD}/ns/finance/sa/market-data"
OTHER = f"spiffe://{TD}/ns/finance/sa/sales-data"
USER = "user:jane@example.com"

ROOT_TASK: dict[str, Any] = {
    "id": "q3",
    "agent": ORCH,
    "purpose": "Q3 risk report",
    "on_behalf_of": USER,
    "ttl": "1h",
    "max_calls": 100,
    "egress": [
        {
            "name": "prices",
            "host": "market.internal",
            "methods": ["GET"],
            "paths": ["/v1/prices/*"],
            "max_calls": 50,
            "scope": "prices:read tables:read",
            "audience": "https://market.internal",
        },
        {"name": "sales", "host": "sales.internal", "methods": ["GET", "POST"], "paths": ["/v1/sales/*"]},
        {
            "name": "sentiment",
            "host": "sentiment.example.com",
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
            "max_calls": 5,
        },
    ],
}


class Scenario:
    """A shared directory with a CA, a root issuer and per-agent state dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = DevCA.create(TD)
        self.ca.save(root / "ca")
        pem = generate_private_key_pem()
        (root / "issuer").mkdir(parents=True, exist_ok=True)
        (root / "issuer" / "issuer.key").write_bytes(pem)
        self.issuer = load_signing_key(pem, "ES256", file="issuer", field="")
        import json

        (root / "issuer" / "issuer.jwks.json").write_text(json.dumps({"keys": [self.issuer.public_jwk]}))
        (root / "secrets").mkdir(exist_ok=True)
        (root / "secrets" / "sentiment.key").write_text("sk-test-sentiment\n")

    def root_grant(self, task: dict[str, Any] | None = None, *, now: float | None = None) -> str:
        spec = TaskSpec.model_validate(copy.deepcopy(task or ROOT_TASK))
        return sign_root_grant(
            spec,
            self.issuer.private_key,
            kid=self.issuer.kid,
            issuer="test-issuer",
            now=now if now is not None else time.time(),
        )

    def agent_config(
        self,
        name: str,
        spiffe_id: str,
        sock_dir: Path,
        *,
        grants: list[str] = (),  # type: ignore[assignment]
        revocations: list[Path] = (),
        publish: bool = False,
        **grant_opts: Any,
    ) -> Path:  # type: ignore[assignment]
        """Write keys, an SVID and ``sidecar.yaml`` for one agent under ``root/name``; returns the config path."""
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        write_keys(state)
        self.ca.write_svid(spiffe_id, state / "svid", name="agent", ttl=dt.timedelta(hours=2))
        for index, token in enumerate(grants):
            (state / f"grant{index}.jwt").write_text(token + "\n")
        config = base_config(sock_dir, [])
        del config["agent"]
        config["identity"] = {
            "source": "files",
            "files": {
                "svid": "svid/agent.pem",
                "key": "svid/agent.key",
                "bundles": {TD: str(self.root / "ca" / "bundle.pem")},
            },
        }
        config["credentials"] = {
            "sentiment": {"header": "x-api-key", "file": str(self.root / "secrets" / "sentiment.key")}
        }
        config["grants"] = {
            "files": [f"grant{i}.jwt" for i in range(len(grants))],
            "root_issuers": [{"jwks": str(self.root / "issuer" / "issuer.jwks.json")}],
            "revocations": [str(p) for p in revocations],
            **grant_opts,
        }
        if publish:
            config["grants"]["publish_revocations"] = str(state / "revocations.jwt")
        return write_config(state, config)


def dump(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def api(proc: SidecarProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the task API of ``proc`` (no proxy): ``(status, decoded JSON body)``."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(proc.admin_url + path, data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


# A delegation request (POST /v1/tasks/q3/delegate) from the orchestrator to the market-data agent.
DELEGATION = {
    "subject": SUB,
    "ttl": "10m",
    "name": "market",
    "max_calls": 5,
    "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/ACME/*"], "max_calls": 5}],
}


def check(sock: Path, host: str, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    """One egress ``Check`` for ``method host/path`` (with the agent's ``headers``, e.g. ``x-agent-task``)
    on the sidecar's gRPC socket ``sock`` (5 s timeout)."""
    raw = check_request(method=method, host=host, path=path, headers=headers)
    message = external_auth_pb2.CheckRequest.FromString(raw)
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        call = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=None,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        return call(message.SerializeToString(), timeout=5)


def reason(response: Any) -> str:
    """The reason of a ``CheckResponse``: ``allowed``, or the ``x-agent-authz-reason`` of a deny."""
    if response.status.code == 0:
        return "allowed"
    return {h.header.key: h.header.value for h in response.denied_response.headers}["x-agent-authz-reason"]
