"""What the agent-protocol tests share: the MCP and A2A rules, the SDK agent's plan and its expected
outcomes, and the SDK agent run as a subprocess behind ``HTTP_PROXY``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

__all__ = [
    "A2A_HOST",
    "CALLS_PLAN",
    "EXPECTED",
    "MCP_HOST",
    "MCP_URL",
    "RISK",
    "WAREHOUSE",
    "reason_of",
    "run_agent",
]

MCP_HOST = "mcp.internal"
A2A_HOST = "risk.internal"
MCP_URL = f"http://{MCP_HOST}/mcp"

WAREHOUSE = {
    "name": "warehouse",
    "host": MCP_HOST,
    "protocol": "mcp",
    "paths": ["/mcp"],
    "tools": [
        {
            "name": "query",
            "arguments": {"/table": {"in": ["prices_q3", "prices_q2"]}},
            "max_calls": 3,
            "record": ["/table"],
        },
        "list_*",
    ],
    "resources": ["table://prices_*"],
    "prompts": ["summarize"],
}
RISK = {
    "name": "risk",
    "host": A2A_HOST,
    "protocol": "a2a",
    "paths": ["/", "/.well-known/agent-card.json"],
    "rpc_methods": ["SendMessage"],
}

CALLS_PLAN = [
    ["list_tools"],
    ["call_tool", "query", {"table": "prices_q3", "sql": "select secret_column"}],
    ["call_tool", "query", {"table": "salaries"}],
    ["call_tool", "drop_table", {"table": "prices_q3"}],
    ["call_tool", "list_tables", {}],
    ["read_resource", "table://prices_q3"],
    ["read_resource", "table://salaries"],
    ["get_prompt", "summarize", {"topic": "q3"}],
    ["call_tool", "query", {"table": "prices_q2"}],
    ["call_tool", "query", {"table": "prices_q3"}],
    ["call_tool", "query", {"table": "prices_q3"}],
]
EXPECTED = [
    "allowed",
    "allowed",
    "argument_not_allowed",
    "tool_not_allowed",
    "allowed",
    "allowed",
    "resource_not_allowed",
    "allowed",
    "allowed",
    "allowed",
    "budget_exhausted",
]


def run_agent(proxy: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the SDK agent with ``HTTP_PROXY`` only; one result per step."""
    environment = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    environment.update(HTTP_PROXY=proxy, http_proxy=proxy)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.mcp_agent", json.dumps(plan)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def reason_of(result: dict[str, Any]) -> str:
    """The outcome of one step of the SDK agent: ``allowed``, or the deny's reason code (from the
    JSON-RPC error's ``data``, else its message)."""
    if result["ok"]:
        return "allowed"
    data = result["error"].get("data") or {}
    return str(data.get("reason", result["error"]["message"]))
