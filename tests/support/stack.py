"""A real sidecar + Envoy + sample upstream for end-to-end tests, and the agent's view of a call."""

from __future__ import annotations

import copy
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.upstream import SampleUpstream, TokenCheck
from sidecar.harness import AuthzStack, http_get
from tests.support.config import API_AUDIENCE, API_HOST, ISSUER, base_config, write_config, write_keys

__all__ = ["Env", "Reply", "metric", "metric_total", "readyz", "send", "start_env"]


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


def start_env(
    state: Path,
    sock_dir: Path,
    tasks: list[dict[str, Any]],
    checks: dict[str, Any] | None = None,
    mutate: Callable[[dict[str, Any], int], None] | None = None,
    **stack_options: Any,
) -> Env:
    """Start the upstream, write keys and config (``mutate(config, upstream_port)`` may edit it), start the stack
    (``stack_options`` go to :class:`~sidecar.harness.AuthzStack`, e.g. log levels)."""
    write_keys(state)
    upstream = SampleUpstream(checks if checks is not None else {API_HOST: TokenCheck(API_AUDIENCE, ISSUER)})
    port = upstream.start()
    config = base_config(sock_dir, tasks, {API_HOST: f"127.0.0.1:{port}", "other.internal": f"127.0.0.1:{port}"})
    if mutate is not None:
        mutate(config, port)
    config_path = write_config(state, config)
    stack = AuthzStack(config_path, state, **stack_options)
    try:
        stack.start()
    except BaseException:
        upstream.stop()
        raise
    upstream.jwks_url = stack.sidecar.admin_url + "/.well-known/jwks.json"
    return Env(state, config_path, config, stack, upstream)


def metric(env: Env, name: str, **labels: str) -> float | None:
    """The value of one sample of ``/metrics`` (``None`` when absent)."""
    status, body = http_get(env.admin + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def metric_total(env: Env, name: str) -> float:
    """The sum of every sample of ``name`` in ``/metrics`` (all label values; 0 when absent)."""
    status, body = http_get(env.admin + "/metrics")
    assert status == 200
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    )


def readyz(env: Env) -> tuple[int, dict[str, Any]]:
    """The admin ``/readyz``: status code and body."""
    status, body = http_get(env.admin + "/readyz")
    return status, json.loads(body)
