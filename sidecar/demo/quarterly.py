"""``agent-authz demo --scenario quarterly-report``: an orchestrator, three sub-agents, one task.

The seed workflow end to end, each agent with its own sidecar and Envoy (as separate pods would
have):

1. An admin signs the root grant ``q3-risk-report`` for the orchestrator (``agent-authz task sign``).
2. The orchestrator delegates narrower sub-grants through its sidecar's task API - market data
   (read-only, one table prefix), sales data (read-only), competitor filings plus the paid sentiment
   API (whose key the sub-agent's sidecar injects) - each signed with the orchestrator's X.509-SVID.
   A widening request is refused and the refusal names the widening field.
3. The sub-agents' sidecars verify the chains offline and enforce them; the upstreams see tokens
   whose ``act`` chain names the sub-agent and the orchestrator, with the root task as ``txn``.
4. Mid-way the orchestrator revokes the sales sub-agent; its next call is denied ``task_revoked``
   (the time from revocation to first deny is measured).
5. The market-data sub-agent is prompt-injected and starts probing outside its task: at the 5th
   out-of-task denial within 10 minutes (the anomaly rule the root grant carries down the tree)
   its task is frozen - ``task_frozen`` record with the evidence, every call then
   ``task_quarantined`` - while its siblings keep working.
6. The orchestrator consolidates the report into temporary storage; deleting it afterwards needs a
   human: the first DELETE is 403 ``approval_required`` with an ``approval_id``, the operator runs
   ``agent-authz approve ID`` with the root issuer key, the retry passes once, a replay is
   ``approval_replayed``.
7. At the end the admin revokes the root task: every agent's next call is denied.

Exits 0 only if every outcome matches expectation and every sidecar's decision log agrees. With
``keep_running`` the four stacks stay up afterwards; the orchestrator's decision viewer then draws the
whole delegation tree (it reads the sub-agents' logs through ``viewer.logs``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.schema import TaskSpec
from sidecar.demo.common import GREEN, RED, color, logs_command, run_agent, wait_for_interrupt, write_secret
from sidecar.demo.upstream import ApiKeyCheck, SampleUpstream, TokenCheck
from sidecar.demo.world import World, admin, print_steps
from sidecar.grants.issue import sign_root_grant
from sidecar.grants.revocations import sign_revocations
from sidecar.harness import AuthzStack
from sidecar.identity.devca import DevCA
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

__all__ = ["run_quarterly"]

TD = "demo.agent-authz.local"
USER = "user:jane.doe@example.com"
ROOT_ID = "q3-risk-report"
ISSUER = "https://agent-authz.demo.local"
AGENTS = {
    "orchestrator": f"spiffe://{TD}/ns/finance/sa/orchestrator",
    "market-data": f"spiffe://{TD}/ns/finance/sa/market-data",
    "sales-data": f"spiffe://{TD}/ns/finance/sa/sales-data",
    "filings": f"spiffe://{TD}/ns/finance/sa/competitor-filings",
}
HOSTS = ["market-data.internal", "sales.internal", "filings.internal", "sentiment.example.com", "storage.internal"]
INTERNAL = [h for h in HOSTS if h.endswith(".internal")]

QUARANTINE = {"threshold": 5, "window": "10m"}
"""The root task's anomaly rule: grants carry it down the delegation tree (a sub-grant's is as strict)."""

ROOT_TASK: dict[str, Any] = {
    "id": ROOT_ID,
    "agent": AGENTS["orchestrator"],
    "on_behalf_of": USER,
    "purpose": "Generate the Q3 quarterly risk assessment report",
    "ttl": "30m",
    "max_calls": 100,
    "max_sensitivity": "confidential",
    "quarantine": QUARANTINE,
    "egress": [
        {
            "name": "market-data",
            "host": "market-data.internal",
            "methods": ["GET"],
            "paths": ["/v1/tables/*"],
            "audience": "https://market-data.internal",
            "scope": "tables:read",
            "max_calls": 40,
        },
        {
            "name": "sales",
            "host": "sales.internal",
            "methods": ["GET"],
            "paths": ["/v1/sales/*"],
            "audience": "https://sales.internal",
            "scope": "sales:read",
        },
        {
            "name": "filings",
            "host": "filings.internal",
            "methods": ["GET"],
            "paths": ["/v1/filings/*"],
            "audience": "https://filings.internal",
            "scope": "filings:read",
        },
        {
            "name": "sentiment",
            "host": "sentiment.example.com",
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
            "max_calls": 4,
        },
        {
            "name": "report-storage",
            "host": "storage.internal",
            "methods": ["PUT", "GET"],
            "paths": ["/v1/tmp/q3/*"],
            "audience": "https://storage.internal",
            "scope": "tmp:write",
        },
        {
            "name": "report-cleanup",
            "host": "storage.internal",
            "methods": ["DELETE"],
            "paths": ["/v1/tmp/q3/*"],
            "audience": "https://storage.internal",
            "scope": "tmp:delete",
            "approval": "required",
        },
    ],
}
SENSITIVITY = {"sales.internal": "confidential", "sentiment.example.com": "public"}
"""The operator's labels of the hosts (``sensitivity.hosts``); the others are ``internal``."""

DELEGATIONS: dict[str, dict[str, Any]] = {
    "market-data": {
        "name": "market-data",
        "ttl": "10m",
        "max_calls": 10,
        "purpose": "Pull Q3 price tables",
        "egress": [
            {"host": "market-data.internal", "methods": ["GET"], "paths": ["/v1/tables/prices_q3/*"], "max_calls": 10}
        ],
    },
    "sales-data": {
        "name": "sales-data",
        "ttl": "10m",
        "max_calls": 10,
        "purpose": "Pull Q3 sales figures",
        "egress": [{"host": "sales.internal", "methods": ["GET"], "paths": ["/v1/sales/q3/*"]}],
    },
    "filings": {
        "name": "filings",
        "ttl": "10m",
        "max_calls": 10,
        "purpose": "Read competitor filings, score sentiment",
        "egress": [
            {"host": "filings.internal", "methods": ["GET"], "paths": ["/v1/filings/*"]},
            {
                "host": "sentiment.example.com",
                "methods": ["POST"],
                "paths": ["/v1/analyze"],
                "credential": "sentiment",
                "max_calls": 2,
            },
        ],
    },
}
WIDENING = {
    "name": "market-data-admin",
    "ttl": "10m",
    "max_calls": 5,
    "subject": AGENTS["market-data"],
    "egress": [
        {"host": "market-data.internal", "methods": ["GET", "DELETE"], "paths": ["/v1/tables/*"], "max_calls": 5}
    ],
}


def _config(world: World, name: str, upstream_port: int, sock_dir: Path) -> Path:
    state = world.state
    home = state / name
    grants: dict[str, Any] = {
        "root_issuers": [{"jwks": str(state / "issuer" / "issuer.jwks.json")}],
        "revocations": [str(state / "issuer" / "revocations.jwt"), str(state / "orchestrator" / "revocations.jwt")],
        "max_depth": 2,
    }
    viewer: dict[str, Any] = {}
    ladder: dict[str, Any] = {
        "files": [str(state / "issuer" / "actions.jwt"), str(state / "orchestrator" / "actions.jwt")],
        "publish": "actions.jwt",  # this sidecar's own quarantines, for the sidecars below it
    }
    if name == "orchestrator":
        grants.update(files=["root-grant.jwt"], publish_revocations="revocations.jwt")
        grants["revocations"] = [str(state / "issuer" / "revocations.jwt")]
        ladder["files"] = [str(state / "issuer" / "actions.jwt")]
        # what the sub-agents spent is only in their own logs: the orchestrator's viewer reads them
        viewer["logs"] = [str(state / other / "decisions.log") for other in AGENTS if other != name]
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
            "destinations": {h: f"127.0.0.1:{upstream_port}" for h in HOSTS},
        },
        "decision_log": {"path": "decisions.log", "stdout": False},
        "credentials": {"sentiment": {"header": "x-api-key", "file": str(state / "secrets" / "sentiment.key")}},
        "grants": grants,
        "viewer": viewer,
        "ladder": ladder,
        "sensitivity": {"hosts": SENSITIVITY},
    }
    path = home / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _prepare(world: World, upstream_port: int, sock_dir: Path) -> tuple[str, Any]:
    state = world.state
    ca = DevCA.create(TD)
    ca.save(state / "ca")
    for name, spiffe_id in AGENTS.items():
        ca.write_svid(spiffe_id, state / name / "svid", name="agent")
    write_secret(state / "keys" / "signing.pem", generate_private_key_pem())
    api_key = "sk-demo-" + generate_private_key_pem()[40:56].hex()
    write_secret(state / "secrets" / "sentiment.key", api_key.encode() + b"\n")
    issuer_pem = generate_private_key_pem()
    write_secret(state / "issuer" / "issuer.key", issuer_pem)
    issuer = load_signing_key(issuer_pem, "ES256", file="issuer.key", field="")
    (state / "issuer" / "issuer.jwks.json").write_text(json.dumps({"keys": [issuer.public_jwk]}))
    root = sign_root_grant(
        TaskSpec.model_validate(ROOT_TASK), issuer.private_key, kid=issuer.kid, issuer="demo-admin", now=time.time()
    )
    (state / "orchestrator" / "root-grant.jwt").write_text(root + "\n")
    for name in AGENTS:
        _config(world, name, upstream_port, sock_dir)
    return api_key, issuer


def _calls(world: World, phase: str, name: str, calls: list[tuple[str, str, str, str]]) -> None:
    """Run ``calls`` = [(method, url, expected status+reason, note)] as agent ``name``."""
    stack = world.stacks[name]
    body = '{"text": "ACME beats Q3 estimates"}'
    results = run_agent(
        world.state / name,
        stack.egress_proxy,
        [{"method": m, "url": u, "body": body if m in ("POST", "PUT") else None} for m, u, _, _ in calls],
        name=f"{phase}-{name}".replace(" ", "-"),
    )
    for (method, url, expected, note), result in zip(calls, results, strict=True):
        reason = result["reason"] or ("allowed" if result["status"] == 200 else "?")
        world.record(
            phase, name, f"{method} {url.removeprefix('http://')}  ({note})", expected, f"{result['status']} {reason}"
        )


def _revocation_latency(world: World, name: str, url: str, started: float) -> float:
    """Seconds from ``started`` until ``name``'s calls to ``url`` are denied (polled through Envoy)."""
    deadline = started + 10
    while time.monotonic() < deadline:
        result = run_agent(
            world.state / name, world.stacks[name].egress_proxy, [{"method": "GET", "url": url}], name="probe"
        )[0]
        if result["reason"] == "task_revoked":
            return time.monotonic() - started
    return float("inf")


def _narrate(world: World, upstream: SampleUpstream, api_key: str) -> list[str]:
    lines = []
    for item in upstream.requests():
        claims = item.claims
        if claims is not None:
            chain: list[str] = []
            act = claims.get("act")
            while isinstance(act, dict):
                chain.append(str(act.get("sub", "")).rsplit("/", 1)[-1])
                act = act.get("act")
            lines.append(
                f"  {item.method:4} {item.host}{item.raw_path}: sub={claims['sub']} act={' <- '.join(chain)} "
                f"txn={claims['txn']} scope={claims.get('scope')} sensitivity={claims.get('sensitivity')}"
            )
        elif item.host == "sentiment.example.com":
            lines.append(
                f"  {item.method:4} {item.host}{item.raw_path}: x-api-key "
                f"{'injected' if item.headers.get('x-api-key') == api_key else 'MISSING'}"
            )
        if item.error:
            world.problems.append(f"upstream rejected {item.method} {item.host}{item.raw_path}: {item.error}")
    return lines


def _hijack(world: World) -> None:
    """Phase 4: market-data probes beyond its task until the anomaly rule freezes it."""
    phase = "4. market-data is prompt-injected mid-task: it probes, and its task is frozen"
    _calls(
        world,
        phase,
        "market-data",
        [
            ("GET", "http://market-data.internal/v1/tables/salaries/rows", "403 path_not_allowed", "4th probe"),
            ("GET", "http://sentiment.example.com/v1/analyze", "403 host_not_allowed", "5th: the rule trips"),
            ("GET", "http://market-data.internal/v1/tables/prices_q3/rows", "403 task_quarantined", "frozen"),
        ],
    )
    records = [json.loads(line) for line in (world.state / "market-data" / "decisions.log").read_text().splitlines()]
    frozen = [r for r in records if r["reason"] == "task_frozen"]
    evidence = frozen[0]["action"]["evidence"] if len(frozen) == 1 else []
    probes = [
        r["decision_id"]
        for r in records
        if r["reason"] in ("path_not_allowed", "method_not_allowed", "host_not_allowed")
    ]
    world.record(
        phase,
        "market-data",
        "task_frozen record: the 5 out-of-task denials as evidence",
        "5 records",
        f"{len(evidence)} records" if evidence == probes[-5:] else f"evidence {evidence} vs probes {probes}",
    )
    _calls(
        world,
        phase,
        "filings",
        [("GET", "http://filings.internal/v1/filings/INITECH/10-Q", "200 allowed", "its siblings keep working")],
    )
    orchestrator = world.stacks["orchestrator"]

    def tree_state() -> str | None:
        status, body = admin(orchestrator, "GET", "/decisions/api/tree")
        states = {n["task_id"]: n["state"] for t in body.get("trees", []) for n in t["nodes"]} if status == 200 else {}
        state = states.get(f"{ROOT_ID}/market-data")
        return state if state == "frozen" else None

    deadline, seen = time.monotonic() + 5, None
    while seen is None and time.monotonic() < deadline:  # the viewer follows the sub-agents' logs
        seen = tree_state()
        if seen is None:
            time.sleep(0.1)
    world.record(phase, "orchestrator", f"its viewer's tree: {ROOT_ID}/market-data", "frozen", seen or "not frozen")


def _approval(world: World, issuer_key: Path) -> None:
    """Phase 6: deleting the temporary report waits for a human approval, granted with the CLI."""
    phase = "6. Deleting the temporary report waits for a human; approved with the CLI, used once"
    stack = world.stacks["orchestrator"]
    url = "http://storage.internal/v1/tmp/q3/report.json"
    first = run_agent(
        world.state / "orchestrator", stack.egress_proxy, [{"method": "DELETE", "url": url}], name="cleanup"
    )[0]
    try:
        approval_id = str(json.loads(first["body"])["approval_id"])
    except (ValueError, KeyError, TypeError):
        approval_id = ""
    world.record(
        phase,
        "orchestrator",
        "DELETE storage.internal/v1/tmp/q3/report.json",
        "403 approval_required",
        f"{first['status']} {first['reason']}",
    )
    approve = [sys.executable, "-m", "sidecar", "approve", approval_id or "none", "--key", str(issuer_key)]
    approve += ["--admin", stack.sidecar.admin_url, "--ttl", "5m"]
    done = subprocess.run(approve, capture_output=True, text=True, timeout=60, check=False)
    world.record(
        phase,
        "operator",
        f"agent-authz approve {approval_id} --key issuer.key --ttl 5m",
        "exit 0",
        f"exit {done.returncode}" + (f": {done.stderr.strip()[:200]}" if done.returncode else ""),
    )
    _calls(
        world,
        phase,
        "orchestrator",
        [
            ("DELETE", url, "200 allowed", "the retry of exactly that call"),
            ("DELETE", url, "403 approval_replayed", "a replay: one call per approval"),
        ],
    )


def _check_logs(world: World) -> int:
    total = 0
    for name in AGENTS:
        text = (world.state / name / "decisions.log").read_text()
        if "eyJ" in text or "sk-demo-" in text:
            world.problems.append(f"{name}: token or key material in the decision log")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        total += len(records)
        if name != "orchestrator" and not any(r["reason"] == "task_revoked" for r in records):
            world.problems.append(f"{name}: the decision log shows no task_revoked")
        for record in records:
            if record["direction"] != "control" and record["decision"] == "allow" and record["txn"] != ROOT_ID:
                world.problems.append(f"{name}: allowed call outside txn {ROOT_ID}")
    return total


def _hold(world: World, logs: list[Path]) -> None:
    orchestrator = world.stacks["orchestrator"]
    print("\nThe four stacks keep running; press Ctrl-C to stop.")
    print(f"  Decision viewer: {orchestrator.sidecar.admin_url}/decisions")
    print("    (the orchestrator's: its task, the sub-grants it issued, and the sub-agents' logs it reads)")
    for name, stack in world.stacks.items():
        if name != "orchestrator":
            print(f"  {name}'s own viewer: {stack.sidecar.admin_url}/decisions")
    print(f"  The same in a terminal: {logs_command(*logs)}", flush=True)
    wait_for_interrupt(lambda: all(s.envoy.alive() and s.sidecar.alive() for s in world.stacks.values()))


def run_quarterly(*, state_dir: Path | None, keep_running: bool = False, envoy_bin: str | None = None) -> int:
    """Run the quarterly-report scenario; 0 when every outcome matches, else 1.

    Args:
        state_dir: where each agent's keys, config and decision log go (``<state_dir>/<agent>/``); a
            temporary directory (removed afterwards) when ``None``.
        keep_running: after the scenario, keep the four stacks up until SIGINT/SIGTERM.
        envoy_bin: Envoy binary override.
    """
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="agent-authz-q3-") if state_dir is None else None
    state = Path(tmp.name) if tmp is not None else Path(state_dir).absolute()  # type: ignore[arg-type]
    state.mkdir(parents=True, exist_ok=True)
    for name in AGENTS:
        (state / name / "decisions.log").unlink(missing_ok=True)
        (state / name / "revocations.jwt").unlink(missing_ok=True)
        (state / name / "actions.jwt").unlink(missing_ok=True)
    (state / "issuer" / "revocations.jwt").unlink(missing_ok=True)
    (state / "issuer" / "actions.jwt").unlink(missing_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="aa-q3-", dir="/tmp"))
    world = World(state)
    upstream = SampleUpstream({})
    try:
        port = upstream.start()
        api_key, issuer = _prepare(world, port, sock_dir)
        upstream.checks = {h: TokenCheck(audience=f"https://{h}", issuer=ISSUER) for h in INTERNAL}
        upstream.checks["sentiment.example.com"] = ApiKeyCheck("x-api-key", api_key)
        for name in AGENTS:
            stack = AuthzStack(state / name / "sidecar.yaml", state / name, envoy_bin=envoy_bin)
            world.stacks[name] = stack
            stack.start()
        upstream.jwks_url = world.stacks["orchestrator"].sidecar.admin_url + "/.well-known/jwks.json"
        orch = world.stacks["orchestrator"]
        print(f"agent-authz demo --scenario quarterly-report: task {ROOT_ID!r} on behalf of {USER}")
        for name, spiffe_id in AGENTS.items():
            print(f"  {name:13} {spiffe_id}  egress {world.stacks[name].egress_proxy}")

        phase = "1. The orchestrator delegates narrower sub-grants (signed with its X.509-SVID)"
        for name, body in DELEGATIONS.items():
            status, reply = admin(orch, "POST", f"/v1/tasks/{ROOT_ID}/delegate", {**body, "subject": AGENTS[name]})
            world.record(phase, "orchestrator", f"delegate to {name}", "201", str(status))
            if status == 201:
                status, _ = admin(world.stacks[name], "POST", "/v1/tasks", reply["grant"])
                world.record(phase, name, f"accept grant {reply['id']}", "201", str(status))
        status, reply = admin(orch, "POST", f"/v1/tasks/{ROOT_ID}/delegate", WIDENING)
        got = f"{status} {reply.get('error')} {reply.get('detail', '').split(':')[1].strip() if status == 400 else ''}"
        world.record(
            phase,
            "orchestrator",
            "delegate DELETE on tables (wider than its own task)",
            "400 grant_widening egress[0].methods",
            got.strip(),
        )

        phase = "2. The sub-agents work, each through its own Envoy and sidecar"
        _calls(
            world,
            phase,
            "market-data",
            [
                ("GET", "http://market-data.internal/v1/tables/prices_q3/rows?limit=100", "200 allowed", "its table"),
                (
                    "GET",
                    "http://market-data.internal/v1/tables/customers/rows",
                    "403 path_not_allowed",
                    "another table",
                ),
                (
                    "DELETE",
                    "http://market-data.internal/v1/tables/prices_q3/rows",
                    "403 method_not_allowed",
                    "read-only",
                ),
                ("GET", "http://sales.internal/v1/sales/q3/summary", "403 host_not_allowed", "not its data"),
            ],
        )
        _calls(
            world,
            phase,
            "sales-data",
            [
                ("GET", "http://sales.internal/v1/sales/q3/summary", "200 allowed", "Q3 sales"),
                ("GET", "http://sales.internal/v1/sales/q2/summary", "403 path_not_allowed", "only Q3"),
            ],
        )
        _calls(
            world,
            phase,
            "filings",
            [
                ("GET", "http://filings.internal/v1/filings/GLOBEX/10-Q", "200 allowed", "competitor filing"),
                ("POST", "http://sentiment.example.com/v1/analyze", "200 allowed", "paid API, key injected"),
                ("POST", "http://sentiment.example.com/v1/analyze", "200 allowed", "paid API, 2nd of 2"),
                ("POST", "http://sentiment.example.com/v1/analyze", "429 budget_exhausted", "its share of the budget"),
            ],
        )

        phase = "3. Mid-way, the orchestrator revokes the sales sub-agent"
        revoked_at = time.monotonic()
        status, reply = admin(orch, "POST", f"/v1/tasks/{ROOT_ID}/sales-data/revoke")
        world.record(phase, "orchestrator", f"revoke {ROOT_ID}/sales-data", "200", str(status))
        latency = _revocation_latency(world, "sales-data", "http://sales.internal/v1/sales/q3/details", revoked_at)
        world.record(
            phase,
            "sales-data",
            f"first deny {latency * 1000:.0f} ms after the revocation",
            "under 1 s",
            "under 1 s" if latency < 1 else f"{latency:.2f} s",
        )
        _calls(
            world,
            phase,
            "market-data",
            [
                ("GET", "http://market-data.internal/v1/tables/prices_q3/rows", "200 allowed", "others keep working"),
            ],
        )

        _hijack(world)

        phase = "5. The orchestrator consolidates the report into temporary storage"
        _calls(
            world,
            phase,
            "orchestrator",
            [
                ("PUT", "http://storage.internal/v1/tmp/q3/report.json", "200 allowed", "its own task"),
                ("GET", "http://storage.internal/v1/tmp/q3/report.json", "200 allowed", "read it back"),
            ],
        )

        _approval(world, state / "issuer" / "issuer.key")

        phase = "7. Done: the admin revokes the whole task; every grant below it ends"
        token = sign_revocations(
            [ROOT_ID], issuer.private_key, issuer="demo-admin", issued_at=int(time.time()), kid=issuer.kid
        )
        revoked_at = time.monotonic()
        (state / "issuer" / "revocations.jwt").write_text(token + "\n")
        latency = _revocation_latency(world, "filings", "http://filings.internal/v1/filings/GLOBEX/10-K", revoked_at)
        world.record(
            phase,
            "filings",
            f"first deny {latency * 1000:.0f} ms after the root revocation",
            "under 1 s",
            "under 1 s" if latency < 1 else f"{latency:.2f} s",
        )
        _calls(
            world,
            phase,
            "market-data",
            [
                ("GET", "http://market-data.internal/v1/tables/prices_q3/rows", "403 task_revoked", "ancestor revoked"),
            ],
        )
        _calls(
            world,
            phase,
            "orchestrator",
            [
                ("GET", "http://storage.internal/v1/tmp/q3/report.json", "403 task_revoked", "root revoked"),
            ],
        )

        print_steps(world)
        print("\nWho did what, for which task, on whose behalf (as the upstreams saw it):")
        for line in _narrate(world, upstream, api_key):
            print(line)
        count = _check_logs(world)
        logs = [state / n / "decisions.log" for n in AGENTS]
        print(f"\nDecision logs: {', '.join(map(str, logs))} ({count} records)")
        if tmp is None:
            print(f"  show them: {logs_command(*logs)}")
        elapsed = time.monotonic() - started
        if world.problems:
            print(color(f"\nFAILED ({len(world.problems)} problems, {elapsed:.1f}s):", RED))
            for problem in world.problems:
                print(f"  - {problem}")
            return 1
        print(color(f"\nAll {len(world.steps)} outcomes match ({elapsed:.1f}s).", GREEN))
        if keep_running:
            _hold(world, logs)
        return 0
    finally:
        for stack in world.stacks.values():
            stack.stop()
        upstream.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
        if tmp is not None:
            tmp.cleanup()
