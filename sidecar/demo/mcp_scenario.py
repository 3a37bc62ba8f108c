"""``agent-authz demo --scenario mcp``: MCP tools and A2A methods as task rules, with the official SDKs.

A slice of the quarterly report, each agent with its own sidecar and Envoy:

1. The admin signs the root grant ``q3-risk-report`` for the orchestrator: the warehouse's MCP
   server (``query`` on ``prices_*`` tables, ``list_tables``) and the risk agent over A2A
   (``SendMessage`` only).
2. The orchestrator delegates to the market-data sub-agent ``query`` on its own table
   (``/table`` equals ``prices_q3``); a delegation of ``drop_table`` is refused (``grant_widening``).
3. The sub-agent - the ``mcp`` SDK's client, unmodified, through ``HTTP_PROXY`` - lists the tools
   (the answer is filtered to ``query``), queries its table (allowed), another table (denied by
   the argument constraint) and drops a table (denied: not a tool of its task).
4. The orchestrator asks the risk agent for a score with the ``a2a-sdk`` client (``SendMessage``,
   allowed) and for a task (``GetTask``, denied: not a method of its task).

Exits 0 only if every outcome matches and the decision logs carry the tool, the digest of the
arguments and the A2A method, and never an argument that is not allow-listed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.schema import TaskSpec
from sidecar.demo.agent_servers import CALLS, ServerThread, risk_agent_app, warehouse_app
from sidecar.demo.common import write_secret
from sidecar.demo.quarterly import AGENTS, ISSUER, TD, USER
from sidecar.demo.world import World, admin, print_steps
from sidecar.grants.issue import sign_root_grant
from sidecar.harness import AuthzStack
from sidecar.identity.devca import DevCA
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

__all__ = ["run_mcp_demo"]

ROOT_ID = "q3-risk-report"
MCP_HOST, A2A_HOST = "warehouse.internal", "risk-agent.internal"
NAMES = ("orchestrator", "market-data")
ROOT_TASK: dict[str, Any] = {
    "id": ROOT_ID,
    "agent": AGENTS["orchestrator"],
    "on_behalf_of": USER,
    "purpose": "Generate the Q3 quarterly risk assessment report",
    "ttl": "30m",
    "max_calls": 100,
    "egress": [
        {
            "name": "warehouse",
            "host": MCP_HOST,
            "protocol": "mcp",
            "paths": ["/mcp"],
            "max_calls": 50,
            "tools": [
                {
                    "name": "query",
                    "arguments": {"/table": {"prefix": "prices_"}},
                    "max_calls": 20,
                    "record": ["/table"],
                },
                "list_tables",
            ],
        },
        {
            "name": "risk-agent",
            "host": A2A_HOST,
            "protocol": "a2a",
            "paths": ["/", "/.well-known/agent-card.json"],
            "rpc_methods": ["SendMessage"],
        },
    ],
}
_WAREHOUSE = {k: v for k, v in ROOT_TASK["egress"][0].items() if k not in ("tools", "max_calls")}
DELEGATION = {
    "name": "market-data",
    "ttl": "10m",
    "max_calls": 10,
    "purpose": "Pull the Q3 price table",
    "egress": [
        {
            **_WAREHOUSE,
            "max_calls": 10,
            "tools": [
                {
                    "name": "query",
                    "arguments": {"/table": {"equals": "prices_q3"}},
                    "max_calls": 5,
                    "record": ["/table"],
                }
            ],
        }
    ],
}
WIDENING = {
    **DELEGATION,
    "name": "market-data-admin",
    "egress": [{**_WAREHOUSE, "max_calls": 10, "tools": ["drop_table"]}],
}
UNRECORDED_SQL = "select * from prices_q3 where note = 'never-in-the-log'"


def _config(state: Path, name: str, sock_dir: Path, ports: dict[str, int]) -> Path:
    grants: dict[str, Any] = {"root_issuers": [{"jwks": str(state / "issuer" / "issuer.jwks.json")}], "max_depth": 2}
    if name == "orchestrator":
        grants["files"] = ["root-grant.jwt"]
    config = {
        "identity": {
            "source": "files",
            "files": {
                "svid": "svid/agent.pem",
                "key": "svid/agent.key",
                "bundles": {TD: str(state / "ca" / "bundle.pem")},
            },
        },
        "issuer": {"url": ISSUER, "signing_key": str(state / "keys" / "signing.pem"), "max_token_ttl": "5m"},
        "listen": {"authz": f"unix:{sock_dir / name}.sock", "admin": "127.0.0.1:0"},
        "envoy": {
            "egress_port": 0,
            "admin_socket": str(sock_dir / f"{name}-envoy-admin.sock"),
            "destinations": {host: f"127.0.0.1:{port}" for host, port in ports.items()},
            # tasks arrive as grants, so Envoy is told which hosts speak MCP and A2A
            "rpc_hosts": {MCP_HOST: "mcp", A2A_HOST: "a2a"},
        },
        "decision_log": {"path": "decisions.log", "stdout": False},
        "grants": grants,
    }
    path = state / name / "sidecar.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _prepare(state: Path, sock_dir: Path, ports: dict[str, int]) -> None:
    ca = DevCA.create(TD)
    ca.save(state / "ca")
    for name in NAMES:
        ca.write_svid(AGENTS[name], state / name / "svid", name="agent")
        _config(state, name, sock_dir, ports)
    write_secret(state / "keys" / "signing.pem", generate_private_key_pem())
    issuer_pem = generate_private_key_pem()
    write_secret(state / "issuer" / "issuer.key", issuer_pem)
    issuer = load_signing_key(issuer_pem, "ES256", file="issuer.key", field="")
    (state / "issuer" / "issuer.jwks.json").write_text(json.dumps({"keys": [issuer.public_jwk]}))
    root = sign_root_grant(
        TaskSpec.model_validate(ROOT_TASK), issuer.private_key, kid=issuer.kid, issuer="demo-admin", now=time.time()
    )
    (state / "orchestrator" / "root-grant.jwt").write_text(root + "\n")


def _sdk_agent(proxy: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["HTTP_PROXY"] = env["http_proxy"] = proxy
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.mcp_agent", json.dumps(plan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _outcome(result: dict[str, Any]) -> str:
    if result["ok"]:
        return "allowed"
    data = result["error"].get("data") or {}
    if data.get("reason"):
        return str(data["reason"])
    return "403" if "403" in result["error"]["message"] else "error"


def _check_logs(world: World) -> int:
    records = {
        name: [json.loads(x) for x in (world.state / name / "decisions.log").read_text().splitlines()] for name in NAMES
    }
    text = json.dumps(records)
    if "never-in-the-log" in text:
        world.problems.append("an argument that is not allow-listed reached a decision log")
    sub = [r for r in records["market-data"] if r.get("mcp", {}).get("method") == "tools/call"]
    if [(r["mcp"]["tool"], r["reason"]) for r in sub] != [
        ("query", "allowed"),
        ("query", "argument_not_allowed"),
        ("drop_table", "tool_not_allowed"),
    ]:
        world.problems.append(f"market-data's tools/call records: {[(r['mcp'].get('tool'), r['reason']) for r in sub]}")
    elif not all(r["mcp"]["arguments_digest"].startswith("sha256:") for r in sub[:2]) or sub[0]["mcp"].get(
        "arguments"
    ) != {"/table": "prices_q3"}:
        world.problems.append("tools/call records lack the arguments digest or the allow-listed /table")
    if any(r["txn"] != ROOT_ID for r in sub):
        world.problems.append("a sub-agent record outside the task's txn")
    a2a = [(r["a2a"]["method"], r["reason"]) for r in records["orchestrator"] if "a2a" in r]
    if a2a != [("SendMessage", "allowed"), ("GetTask", "rpc_method_not_allowed")]:
        world.problems.append(f"orchestrator's A2A records: {a2a}")
    return sum(len(r) for r in records.values())


def run_mcp_demo(*, state_dir: Path | None, envoy_bin: str | None = None) -> int:
    """Run the MCP/A2A scenario; 0 when every outcome matches, else 1 (2 without the SDKs)."""
    import importlib.util

    missing = [name for name in ("mcp", "a2a", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"agent-authz demo --scenario mcp needs the official SDKs ({', '.join(missing)} missing): "
            "pip install -e '.[test]'",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="agent-authz-mcp-") if state_dir is None else None
    state = Path(tmp.name) if tmp is not None else Path(state_dir).absolute()  # type: ignore[arg-type]
    state.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (state / name / "decisions.log").unlink(missing_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="aa-mcp-", dir="/tmp"))
    world = World(state)
    servers = [ServerThread(warehouse_app([MCP_HOST])), ServerThread(risk_agent_app(f"http://{A2A_HOST}/"))]
    try:
        ports = {MCP_HOST: servers[0].start(), A2A_HOST: servers[1].start()}
        _prepare(state, sock_dir, ports)
        for name in NAMES:
            world.stacks[name] = AuthzStack(state / name / "sidecar.yaml", state / name, envoy_bin=envoy_bin)
            world.stacks[name].start()
        orch, sub = world.stacks["orchestrator"], world.stacks["market-data"]
        print(f"agent-authz demo --scenario mcp: task {ROOT_ID!r} on behalf of {USER}")
        print(
            f"  MCP server http://{MCP_HOST}/mcp (tools query, list_tables, drop_table), A2A agent http://{A2A_HOST}/"
        )

        phase = "1. The orchestrator delegates one tool on one table (a grant signed with its SVID)"
        status, refused = admin(
            orch, "POST", f"/v1/tasks/{ROOT_ID}/delegate", {**WIDENING, "subject": AGENTS["market-data"]}
        )
        field = refused.get("detail", "").split(":")[1].strip() if status == 400 else ""
        world.record(
            phase,
            "orchestrator",
            "delegate drop_table (not in its own task)",
            "400 egress[0] (warehouse).tools",
            f"{status} {field}",
        )
        status, issued = admin(
            orch, "POST", f"/v1/tasks/{ROOT_ID}/delegate", {**DELEGATION, "subject": AGENTS["market-data"]}
        )
        world.record(phase, "orchestrator", "delegate query on prices_q3", "201", str(status))
        if status == 201:
            status, _ = admin(sub, "POST", "/v1/tasks", issued["grant"])
            world.record(phase, "market-data", f"accept grant {issued['id']}", "201", str(status))

        phase = "2. The market-data sub-agent uses the MCP SDK client (Streamable HTTP, HTTP_PROXY)"
        before = len(CALLS)
        steps = [
            (["list_tools"], "allowed", "tools/list"),
            (["call_tool", "query", {"table": "prices_q3", "sql": UNRECORDED_SQL}], "allowed", "query its own table"),
            (["call_tool", "query", {"table": "salaries"}], "argument_not_allowed", "query another table"),
            (["call_tool", "drop_table", {"table": "prices_q3"}], "tool_not_allowed", "drop_table"),
        ]
        results = _sdk_agent(sub.egress_proxy, [{"mcp": f"http://{MCP_HOST}/mcp", "calls": [s[0] for s in steps]}])
        for index, (_, expected, note) in enumerate(steps):
            got = _outcome(results[index]) if index < len(results) else "no result"
            world.record(phase, "market-data", note, expected, got)
        listed = results[0].get("result") if results else None
        world.record(phase, "market-data", "tools/list shows", "['query']", str(listed))
        world.record(
            phase, "market-data", "calls the server executed", "['query']", str([c[0] for c in CALLS[before:]])
        )

        phase = "3. The orchestrator asks the risk agent (a2a-sdk client, JSON-RPC)"
        a2a = _sdk_agent(
            orch.egress_proxy,
            [
                {"a2a": f"http://{A2A_HOST}/", "text": "score portfolio Q3"},
                {"a2a": f"http://{A2A_HOST}/", "get_task": "t-1"},
            ],
        )
        world.record(phase, "orchestrator", "SendMessage", "allowed", _outcome(a2a[0]) if a2a else "no result")
        world.record(phase, "orchestrator", "GetTask", "403", _outcome(a2a[1]) if len(a2a) > 1 else "no result")

        records = _check_logs(world)
        print_steps(world)
        print(f"\n{records} decisions recorded in the two decision logs")
        if tmp is None:
            print(f"  agent-authz logs {state}/market-data/decisions.log --tool query")
    except Exception as exc:
        world.problems.append(f"the scenario stopped: {type(exc).__name__}: {exc}")
    finally:
        for stack in world.stacks.values():
            stack.stop()
        for server in servers:
            server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    if world.problems:
        print("\nMISMATCHES:\n  " + "\n  ".join(world.problems), file=sys.stderr)
        print(f"finished in {elapsed:.1f} s with {len(world.problems)} mismatch(es)")
        return 1
    print(f"every outcome matched ({len(world.steps)} checks) in {elapsed:.1f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0
