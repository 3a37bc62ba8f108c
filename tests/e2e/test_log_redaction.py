"""No credential in any log the pod writes: Envoy's access log and its own log at the most verbose level
the sidecar starts it with, the sidecar's log at debug, the decision log - whatever the agent puts in a
query string, an ``Authorization`` header or a forged reserved header (the ``drop-query`` log policy)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.bootstrap.launch import ENVOY_LOG_LEVELS
from sidecar.harness import wait_until
from tests.support.config import API_AUDIENCE, API_HOST, task
from tests.support.stack import Env, start_env

pytestmark = pytest.mark.e2e

API_KEY = "sk-live-API-KEY-0123456789"
QUERY_SECRETS = ("QUERY-SECRET-1", "QUERY-SECRET-2", "QUERY-SECRET-3")
AGENT_SECRET = "AGENT-OWN-BEARER-SECRET"
TASKS = [
    task(
        "logs",
        egress=[
            {"name": "api", "host": API_HOST, "methods": ["GET"], "paths": ["/v1/*"], "audience": API_AUDIENCE},
            {
                "name": "keyed",
                "host": "other.internal",
                "methods": ["GET"],
                "paths": ["/v1/*"],
                "token": False,
                "credential": {"header": "x-api-key", "file": "api.key"},
            },
        ],
    )
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    sock_dir = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    state = tmp_path_factory.mktemp("redaction")
    (state / "api.key").write_text(API_KEY + "\n")
    verbose = ENVOY_LOG_LEVELS[0]  # the most verbose level the sidecar starts Envoy with
    running = start_env(state, sock_dir, TASKS, checks={}, envoy_log_level=verbose, sidecar_log_level="debug")
    yield running
    running.stack.stop()
    running.upstream.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def _logs(env: Env) -> dict[str, str]:
    """Every file the sidecar and Envoy wrote in the state directory (their stdout/stderr, decisions)."""
    return {p.name: p.read_text(errors="replace") for p in env.state.iterdir() if p.suffix in (".out", ".err", ".log")}


def test_no_credential_reaches_any_log(env: Env) -> None:
    calls: list[tuple[str, dict[str, str]]] = [
        (f"http://{API_HOST}/v1/items?api_key={QUERY_SECRETS[0]}", {"Authorization": f"Bearer {AGENT_SECRET}"}),
        (f"http://other.internal/v1/keyed?token={QUERY_SECRETS[1]}&x=1", {}),
        (f"http://{API_HOST}/v2/denied?password={QUERY_SECRETS[2]}", {"x-agent-authz-caller": AGENT_SECRET}),
        (f"http://{API_HOST}/v1/%2e%2e/bad?k={QUERY_SECRETS[0]}", {}),
    ]
    replies = [env.send("GET", url, headers=headers) for url, headers in calls]
    assert [r.status for r in replies] == [200, 200, 403, 403], [r.body for r in replies]  # /v1/../bad is /bad
    received = env.upstream.requests()
    minted = [r.headers["authorization"].removeprefix("Bearer ") for r in received if "authorization" in r.headers]
    assert minted and any(r.headers.get("x-api-key") == API_KEY for r in received)
    # the access log lines are written (flushed every 250 ms by the harness)
    wait_until(lambda: _logs(env)["envoy.out"].count('"decision_id"') >= len(calls), timeout=10, what="access log")
    secrets: dict[str, Any] = {s: "query" for s in QUERY_SECRETS}
    secrets.update({AGENT_SECRET: "agent header", API_KEY: "API key", **{t: "minted token" for t in minted}})
    found = [(what, name) for name, text in _logs(env).items() for secret, what in secrets.items() if secret in text]
    assert found == [], found
    # and the paths are still there, without their queries
    access = _logs(env)["envoy.out"]
    assert '"path":"/v1/items"' in access and '"path":"/v2/denied"' in access
