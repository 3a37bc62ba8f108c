"""``agent-authz demo --scenario cluster``: the quarterly-report workflow across pods of a simulated cluster.

The demo is run as a user runs it (the CLI, as root); its ``outcomes.json`` is then checked step by
step: the orchestrator pod admitted and injected, its sub-agent Jobs created through the API server
double and admitted by the real webhook, each sub-agent's calls (allowed ones verified upstream by a
stock Envoy's ``jwt_authn`` against the authority's JWKS, the paid API key from a Secret), the
refusals (an unsigned task from a non-author, the Secret), a sub-agent's revocation and the root
task's reaching each pod in under a second, the fail-closed ``revocation_feed_stale`` deny of the pod
whose feed is cut, its recovery, and the Jobs completed. See ``sidecar/demo/cluster/scenario.py``.
Needs root (namespaces, mounts, iptables) and helm; skipped without root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.demo.cluster.scenario import MAX_STALENESS, ORCHESTRATOR_ROLE, ROOT_ID, SUB_AGENTS
from tests.support.k8s import helm, validate

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the cluster scenario needs root (namespaces, mounts, iptables)"),
]

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "guides" / "sub-agents.md"


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    helm("version")  # installs .tools/bin/helm once if missing
    base = Path(tempfile.mkdtemp(prefix="aa-cd-", dir="/tmp"))  # short: Unix sockets live below it
    try:
        state = base / "state"
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "demo", "--scenario", "cluster", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=REPO,
            check=False,
        )
        outcome = json.loads((state / "outcomes.json").read_text())
        yield result, outcome
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _step(outcome: dict[str, Any], agent: str, action: str) -> dict[str, Any]:
    found = [s for s in outcome["steps"] if s["agent"] == agent and s["action"].startswith(action)]
    assert len(found) == 1, (agent, action, [s["action"] for s in outcome["steps"] if s["agent"] == agent])
    return found[0]


def test_every_outcome_matches_and_the_demo_exits_0(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    result, outcome = run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert outcome["problems"] == []
    assert all(step["ok"] for step in outcome["steps"])
    assert f"All {len(outcome['steps'])} outcomes match" in result.stdout
    assert len(outcome["steps"]) >= 35


def test_the_pods_are_admitted_and_the_jobs_created_through_the_api_server(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, outcome = run
    assert _step(outcome, "pipeline", "create pod orchestrator")["got"] == "201 injected"
    for name in SUB_AGENTS:
        assert _step(outcome, "orchestrator", f"delegate {ROOT_ID}/{name}")["got"] == "201"
        assert _step(outcome, "orchestrator", f"create Job {name} with the child grant")["got"] == "201"
        assert _step(outcome, name, "the job controller's pod, injected")["got"] == "injected"
        assert _step(outcome, "orchestrator", f"GET Job {name}: succeeded")["got"] == "1"
    assert _step(outcome, "orchestrator", "create a Job with an unsigned task")["got"] == "403 not a task author"
    assert _step(outcome, "orchestrator", "read the sentiment API key's Secret")["got"] == "403"


def test_the_sub_agents_calls_tokens_and_the_secret_mounted_key(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, outcome = run
    assert _step(outcome, "market-data", "GET market-data.internal/v1/tables/prices_q3/rows?")["got"] == "200 allowed"
    assert (
        _step(outcome, "market-data", "GET market-data.internal/v1/tables/customers")["got"] == "403 path_not_allowed"
    )
    assert _step(outcome, "market-data", "GET sales.internal")["got"] == "403 host_not_allowed"
    assert _step(outcome, "sales-data", "GET sales.internal/v1/sales/q3/summary")["got"] == "200 allowed"
    assert _step(outcome, "filings", "POST sentiment.example.com")["got"] == "200 allowed"
    iss = _step(outcome, "market-data", "the token the API got: iss")["got"]
    assert iss == "https://aa-agent-authz-authority.agent-authz.svc/ns/agents"
    assert _step(outcome, "node", "GET market-data.internal without a token")["got"] == "401"  # jwt_authn
    assert _step(outcome, "filings", "the paid API got the Secret's key")["got"] == "injected"
    assert _step(outcome, "filings", "the agent's container sees")["got"] == "absent absent"


def test_revocations_reach_each_pod_in_under_a_second(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, outcome = run
    figures = outcome["figures"]
    assert set(figures["sub-agent revoke"]) == {"sales-data"}
    assert set(figures["root revoke"]) == {"orchestrator", "market-data", "filings"}
    for what in ("sub-agent revoke", "root revoke"):
        for pod, seconds in figures[what].items():
            assert seconds is not None and 0 <= seconds < 1, (what, pod, seconds)
    assert _step(outcome, "admin", f"task revoke {ROOT_ID} --authority")["got"] == "exit 0"
    assert _step(outcome, "orchestrator", "delegate again under the revoked task")["got"] == "refused"


def test_a_pod_whose_feed_is_cut_fails_closed_then_recovers(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, outcome = run
    stale = outcome["figures"]["stale after the cut"]["market-data"]
    # staleness counts from the last event (a heartbeat every 0.5 s), so it comes at most one
    # heartbeat early and never before the feed fell silent
    assert stale is not None and MAX_STALENESS - 1 <= stale <= MAX_STALENESS + 5
    assert _step(outcome, "market-data", "denied revocation_feed_stale")["ok"]
    assert _step(outcome, "filings", "GET filings.internal/v1/filings/GLOBEX/10-K")["got"] == "200 allowed"
    assert outcome["figures"]["feed reconnect"]["market-data"] is not None
    assert _step(outcome, "market-data", "GET market-data.internal/v1/tables/prices_q3/rows  (its task")["ok"]


def test_the_orchestrators_role_is_the_one_the_guide_documents() -> None:
    import yaml

    blocks = [b.split("```")[0] for b in DOCS.read_text().split("```yaml\n")[1:]]
    (block,) = [b for b in blocks if b.startswith("# the orchestrator's Role")]
    (role,) = [d for d in yaml.safe_load_all(block) if d and d["kind"] == "Role"]
    assert role["rules"] == ORCHESTRATOR_ROLE["rules"]
    validate(ORCHESTRATOR_ROLE)
