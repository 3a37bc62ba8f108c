"""``agent-authz demo``: the quarterly-report task through real Envoy, end to end.

Starts the sample upstreams (the paid sentiment API serves HTTPS with a certificate of the demo's
own upstream CA), the sidecar and Envoy, then runs the sample agent (a plain ``urllib`` client using
``HTTP_PROXY``/``HTTPS_PROXY`` and trusting the pod CA through ``SSL_CERT_FILE``) and checks every
outcome three ways: what the agent got, what the upstream received (token verified against the
JWKS, API key present and received over TLS, agent's own credential gone), and what the decision
log says (the HTTPS calls as ``tls: intercept``). Exits 0 only if all of it matches.
"""

from __future__ import annotations

import json
import secrets
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sidecar.demo import scenario
from sidecar.demo.common import GREEN, RED, color, logs_command, run_agent, table, wait_for_interrupt, write_secret
from sidecar.demo.tls_client import mtls_request
from sidecar.demo.upstream import ApiKeyCheck, SampleUpstream, TokenCheck
from sidecar.harness import AuthzStack
from sidecar.identity.devca import DevCA
from sidecar.tls_intercept.ca import PodCA
from sidecar.tls_intercept.trust import agent_trust_env
from sidecar.tokens.keys import generate_private_key_pem

__all__ = ["run_demo"]


@dataclass
class _Outcome:
    call: scenario.Call
    status: int
    reason: str
    decision_id: str | None
    ok: bool


def _upstream_tls(state: Path) -> ssl.SSLContext:
    """The sentiment API's server context: a certificate for its name from the demo's upstream CA."""
    now = time.time()
    upstream_ca = PodCA.create(ttl=3600, now=now, label="demo upstream CA")
    leaf = upstream_ca.issue(scenario.SENTIMENT, ttl=3600, now=now)
    (state / "upstream-ca").mkdir(parents=True, exist_ok=True)
    (state / "upstream-ca" / "ca.pem").write_bytes(upstream_ca.cert_pem)
    write_secret(state / "upstream-ca" / "sentiment.pem", leaf.cert_pem + leaf.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(state / "upstream-ca" / "sentiment.pem")
    return context


def _prepare(state: Path, upstream_port: int, agent_app_port: int, sentiment_port: int) -> tuple[Path, str]:
    ca = DevCA.create(scenario.TRUST_DOMAIN)
    ca.save(state / "ca")
    for spiffe_id in (scenario.AGENT, scenario.ORCHESTRATOR, scenario.INTRUDER):
        ca.write_svid(spiffe_id, state / "svids")
    write_secret(state / "keys" / "signing.pem", generate_private_key_pem("ES256"))
    write_secret(state / "keys" / "next.pem", generate_private_key_pem("ES256"))
    api_key = "sk-demo-" + secrets.token_hex(16)
    write_secret(state / "secrets" / "sentiment-api.key", api_key.encode() + b"\n")
    config = state / "sidecar.yaml"
    settings = scenario.sidecar_config(state, upstream_port, agent_app_port, sentiment_port)
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config, api_key


def _check_upstream(
    upstream: SampleUpstream, sentiment: SampleUpstream, api_key: str, problems: list[str]
) -> list[str]:
    seen = upstream.requests() + sentiment.requests()
    lines = []
    for item in seen:
        if item.error:
            problems.append(f"upstream rejected {item.method} {item.host}{item.raw_path}: {item.error}")
        if "agent-supplied-secret" in json.dumps(dict(item.headers)):
            problems.append("the agent's own Authorization reached the upstream")
        if item.host == scenario.MARKET and item.claims is not None:
            claims = item.claims
            if claims.get("sub") != scenario.ON_BEHALF_OF or claims.get("act") != {"sub": scenario.AGENT}:
                problems.append(f"token subject/actor wrong: {claims.get('sub')} / {claims.get('act')}")
            if claims.get("txn") != scenario.TASK_ID:
                problems.append(f"token txn is {claims.get('txn')!r}")
            lines.append(
                f"  {item.method} {item.host}{item.raw_path}\n"
                f"      Bearer token verified: sub={claims['sub']} act.sub={claims['act']['sub']}\n"
                f"      aud={claims['aud']} scope={claims.get('scope')} txn={claims['txn']} "
                f"lifetime={claims['exp'] - claims['iat']}s jti={claims['jti'][:8]}…"
            )
        if item.host == scenario.SENTIMENT:
            ok = item.headers.get("x-api-key") == api_key
            if not ok:
                problems.append("sentiment API did not get the injected key")
            if item.scheme != "https":
                problems.append("the sentiment API call did not arrive over TLS")
            lines.append(
                f"  {item.method} https://{item.host}{item.raw_path}\n      x-api-key injected: "
                f"{'yes' if ok else 'NO'}, received over {item.scheme.upper()} (Envoy verified the API's certificate)"
            )
    allowed = sum(1 for c in scenario.calls() if c.status == 200)
    if len(seen) != allowed:
        problems.append(f"upstream received {len(seen)} requests, expected {allowed}")
    return lines


def _check_log(log_path: Path, outcomes: list[_Outcome], api_key: str, problems: list[str]) -> int:
    text = log_path.read_text() if log_path.exists() else ""
    if api_key in text or "eyJ" in text or "agent-supplied-secret" in text:
        problems.append("credential or token material found in the decision log")
    records = {r["decision_id"]: r for r in (json.loads(line) for line in text.splitlines() if line.strip())}
    for outcome in outcomes:
        record = records.get(outcome.decision_id or "")
        if record is None:
            problems.append(f"no decision record for call {outcome.call.method} {outcome.call.url}")
        elif record["reason"] != outcome.call.reason:
            problems.append(f"decision record says {record['reason']} for {outcome.call.url}")
        elif outcome.call.url.startswith("https://") and (record.get("tls"), record["sni"]) != (
            "intercept",
            scenario.SENTIMENT,
        ):
            problems.append(f"the record of {outcome.call.url} does not show the intercepted TLS")
    return len(records)


def _egress_rows(outcomes: list[_Outcome]) -> list[tuple[str, str, str, str, str, str, bool]]:
    return [
        (
            str(i),
            f"{o.call.method} {o.call.url.removeprefix('http://')}",  # https:// stays: intercepted TLS
            f"{o.call.status} {o.call.reason}",
            f"{o.status} {o.reason}",
            o.decision_id or "",
            o.call.note,
            o.ok,
        )
        for i, o in enumerate(outcomes, 1)
    ]


def _run_inbound(
    state: Path, port: int, app: SampleUpstream, problems: list[str]
) -> list[tuple[str, str, str, str, str, str, bool]]:
    rows = []
    for i, call in enumerate(scenario.inbound_calls(), 1):
        name = call.caller.rsplit("/", 1)[-1] if call.caller else None
        client = (state / "svids" / f"{name}.pem", state / "svids" / f"{name}.key") if name else None
        before = len(app.requests())
        reply = mtls_request(port, state / "ca" / "bundle.pem", client, call.path, method=call.method)
        if reply.status is None:
            got = "TLS handshake refused"
            ok = call.status is None
        else:
            reason = reply.reason or ("allowed" if reply.status == 200 else "?")
            got = f"{reply.status} {reason}"
            ok = reply.status == call.status and reason == call.reason
        if ok and call.status == 200:
            seen = app.requests()[before:]
            ok = len(seen) == 1 and seen[0].headers.get("x-agent-authz-caller") == call.caller
            if not ok:
                problems.append(f"the agent did not see the verified caller for {call.method} {call.path}")
        elif len(app.requests()) != before:
            ok = False
            problems.append(f"a refused call reached the agent: {call.method} {call.path}")
        if not ok:
            problems.append(f"inbound {call.method} {call.path} from {call.caller}: got {got}")
        expected = "TLS handshake refused" if call.status is None else f"{call.status} {call.reason}"
        who = call.caller.removeprefix(f"spiffe://{scenario.TRUST_DOMAIN}") if call.caller else "(no certificate)"
        rows.append(
            (
                str(i),
                f"{who} {call.method} {call.path}",
                expected,
                got,
                reply.headers.get("x-agent-authz-decision-id", ""),
                call.note,
                ok,
            )
        )
    return rows


def run_demo(*, state_dir: Path | None, keep_running: bool = False, envoy_bin: str | None = None) -> int:
    """Run the demo; returns 0 when every outcome matches the task, else 1.

    Args:
        state_dir: where keys, config, logs and ``decisions.log`` go; a temporary directory
            (removed afterwards) when ``None``.
        keep_running: after the scenario, keep the stack up until SIGINT/SIGTERM.
        envoy_bin: Envoy binary override.
    """
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="agent-authz-demo-") if state_dir is None else None
    state = Path(tmp.name) if tmp is not None else Path(state_dir).absolute()  # type: ignore[arg-type]
    state.mkdir(parents=True, exist_ok=True)
    for stale in ("decisions.log", "agent-calls.json"):
        (state / stale).unlink(missing_ok=True)
    upstream = SampleUpstream({})
    sentiment = SampleUpstream({}, ssl_context=_upstream_tls(state))  # the paid API, over HTTPS
    agent_app = SampleUpstream({})  # the agent's own API, behind Envoy's mTLS ingress listener
    stack: AuthzStack | None = None
    try:
        port = upstream.start()
        config, api_key = _prepare(state, port, agent_app.start(), sentiment.start())
        upstream.checks = {scenario.MARKET: TokenCheck(audience=scenario.MARKET_AUDIENCE, issuer=scenario.ISSUER)}
        sentiment.checks = {scenario.SENTIMENT: ApiKeyCheck("x-api-key", api_key)}
        stack = AuthzStack(config, state, envoy_bin=envoy_bin)
        stack.start()
        upstream.jwks_url = stack.sidecar.admin_url + "/.well-known/jwks.json"

        ingress_port = stack.envoy.listener_port("ingress_https")
        print(f"agent-authz demo - task {scenario.TASK_ID!r}")
        print(f"  agent         {scenario.AGENT} (from its X.509-SVID)")
        print(f"  on behalf of  {scenario.ON_BEHALF_OF}")
        print(f"  envoy egress  {stack.egress_proxy} (the agent's HTTP_PROXY and HTTPS_PROXY)")
        print(f"  pod CA        {state / 'trust' / 'ca.pem'} (the agent trusts it: SSL_CERT_FILE=…/ca-bundle.pem)")
        print(f"  envoy ingress https://127.0.0.1:{ingress_port} (mTLS, SPIFFE X.509-SVIDs)")
        print(f"  state dir     {state}\n")

        calls = scenario.calls()
        trust = agent_trust_env(state / "trust")
        results = run_agent(state, stack.egress_proxy, [c.as_json() for c in calls], trust=trust)
        problems: list[str] = []
        outcomes = []
        if len(results) != len(calls):
            problems.append(f"the agent reported {len(results)} results for {len(calls)} calls")
        for call, result in zip(calls, results, strict=False):
            reason = result["reason"] or ("allowed" if result["status"] == 200 else "?")
            ok = result["status"] == call.status and reason == call.reason
            outcomes.append(_Outcome(call, result["status"], reason, result["decision_id"], ok))
            if not ok:
                problems.append(f"{call.method} {call.url}: expected {call.status} {call.reason}, got {result}")
        print("Egress - the agent calls out:")
        print(table(_egress_rows(outcomes)))
        print("\nIngress - other workloads call the agent:")
        inbound = _run_inbound(state, ingress_port, agent_app, problems)
        print(table(inbound))
        print("\nWhat the upstream received:")
        for line in _check_upstream(upstream, sentiment, api_key, problems):
            print(line)
        log_path = state / "decisions.log"
        count = _check_log(log_path, outcomes, api_key, problems)
        print(f"\nDecision log: {log_path} ({count} records, no token or key material)")
        if tmp is None:
            print(f"  show it: {logs_command(log_path)}   verify its chain: agent-authz logs verify {log_path}")
        elif not keep_running:
            print("  (a temporary directory, removed on exit: --state-dir DIR keeps it to read or verify)")
        elapsed = time.monotonic() - started
        if problems:
            print(color(f"\nFAILED ({len(problems)} problems, {elapsed:.1f}s):", RED))
            for problem in problems:
                print(f"  - {problem}")
            return 1
        total = len(outcomes) + len(inbound)
        print(color(f"\nAll {total} outcomes match the task and the ingress policy ({elapsed:.1f}s).", GREEN))
        if keep_running:
            _hold(stack, upstream)
        return 0
    finally:
        if stack is not None:
            stack.stop()
        upstream.stop()
        sentiment.stop()
        agent_app.stop()
        if tmp is not None:
            tmp.cleanup()


def _hold(stack: AuthzStack, upstream: SampleUpstream) -> None:
    print("\nThe stack keeps running; press Ctrl-C to stop.")
    print(f"  Decision viewer: {stack.sidecar.admin_url}/decisions")
    print(f"  The same in a terminal: {logs_command(stack.work_dir / 'decisions.log', follow=True)}")
    print(f"  curl -x {stack.egress_proxy} http://{scenario.MARKET}/v1/prices/ACME")
    ca = stack.work_dir / "trust" / "ca.pem"
    print(f"  curl -x {stack.egress_proxy} --cacert {ca} https://{scenario.SENTIMENT}/v1/analyze -d '{{}}'")
    print(f"  JWKS:        {stack.sidecar.admin_url}/.well-known/jwks.json")
    print(f"  Envoy admin: curl --unix-socket {stack.envoy.admin_address} http://envoy/stats", flush=True)
    wait_for_interrupt(lambda: stack.envoy.alive() and stack.sidecar.alive())
