"""Delegation across real sidecar processes: the task API, offline chain verification, revocation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from sidecar.harness import SidecarProcess, wait_until
from tests.support.grants_env import DELEGATION, ORCH, SUB, Scenario, api, check, reason

pytestmark = pytest.mark.e2e


@pytest.fixture
def agents(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Scenario, SidecarProcess, SidecarProcess, Path]]:
    sc = Scenario(tmp_path)
    orch_dir, sub_dir = short_dir / "o", short_dir / "s"
    orch_dir.mkdir()
    sub_dir.mkdir()
    orch_cfg = sc.agent_config("orch", ORCH, orch_dir, grants=[sc.root_grant()], publish=True)
    sub_cfg = sc.agent_config("sub", SUB, sub_dir, revocations=[tmp_path / "orch" / "revocations.jwt"])
    orch = SidecarProcess(orch_cfg, log_dir=tmp_path / "orch")
    sub = SidecarProcess(sub_cfg, log_dir=tmp_path / "sub")
    try:
        for proc in (orch, sub):
            proc.start()
        for proc in (orch, sub):
            proc.wait_ready()
        yield sc, orch, sub, sub_dir / "authz.sock"
    finally:
        orch.stop()
        sub.stop()


def test_delegate_accept_enforce_and_revoke(agents: tuple[Scenario, SidecarProcess, SidecarProcess, Path]) -> None:
    _, orch, sub, sub_sock = agents
    status, issued = api(orch, "POST", "/v1/tasks/q3/delegate", DELEGATION)
    assert status == 201, issued
    assert issued["id"] == "q3/market" and jwt.get_unverified_header(issued["grant"])["typ"] == "agent-task+jwt"
    status, tasks = api(orch, "GET", "/v1/tasks")
    q3 = next(t for t in tasks["tasks"] if t["id"] == "q3")
    assert q3["budget"]["used"] == 5 and q3["budget"]["rules"]["prices"]["used"] == 5  # reserved
    assert q3["budget"]["reserved"] == 5 and [(d["id"], d["agent"], d["max_calls"]) for d in q3["delegated"]] == [
        ("q3/market", SUB, 5)
    ]

    assert reason(check(sub_sock, "market.internal", "/v1/prices/ACME/x")) == "no_task"
    status, accepted = api(sub, "POST", "/v1/tasks", issued["grant"])
    assert status == 201 and accepted["id"] == "q3/market"
    response = check(sub_sock, "market.internal", "/v1/prices/ACME/x")
    assert reason(response) == "allowed"
    token = {h.header.key: h.header.value for h in response.ok_response.headers}["authorization"][7:]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["act"] == {"sub": SUB, "act": {"sub": ORCH}} and claims["txn"] == "q3"

    status, _ = api(orch, "POST", "/v1/tasks/q3/market/revoke")
    assert status == 200
    assert next(t for t in api(orch, "GET", "/v1/tasks")[1]["tasks"] if t["id"] == "q3")["delegated"][0]["revoked_here"]
    started = time.monotonic()
    wait_until(
        lambda: reason(check(sub_sock, "market.internal", "/v1/prices/ACME/x")) == "task_revoked",
        timeout=5,
        what="revocation reaches the sub-agent's sidecar",
        interval=0.005,
    )
    latency = time.monotonic() - started
    print(f"revocation file change -> first deny: {latency * 1000:.0f} ms")
    assert latency < 1.0
    records = [json.loads(line) for line in (Path(sub.log_dir) / "decisions.log").read_text().splitlines()]
    assert records[-1]["reason"] == "task_revoked" and records[-1]["txn"] == "q3"
    assert any(r["act"] == [SUB, ORCH] for r in records)


def test_task_api_refusals(agents: tuple[Scenario, SidecarProcess, SidecarProcess, Path]) -> None:
    _, orch, sub, _ = agents
    widening = dict(
        DELEGATION,
        egress=[{"host": "market.internal", "methods": ["GET", "DELETE"], "paths": ["/v1/prices/*"], "max_calls": 1}],
    )
    status, body = api(orch, "POST", "/v1/tasks/q3/delegate", widening)
    assert status == 400 and body["error"] == "grant_widening" and "egress[0].methods" in body["detail"]
    assert api(orch, "POST", "/v1/tasks/nope/delegate", DELEGATION)[0] == 404
    assert api(orch, "POST", "/v1/tasks/q3/delegate", {"subject": "not-an-id"})[0] == 400
    assert api(orch, "POST", "/v1/tasks/q3/delegate", "{broken json")[0] == 400
    assert api(sub, "POST", "/v1/tasks", "not.a.grant")[1]["error"] == "grant_malformed"
    assert api(sub, "POST", "/v1/tasks", '{"grant": 5}')[0] == 400
    assert api(sub, "GET", "/v1/revocations")[0] == 404
    status, issued = api(orch, "POST", "/v1/tasks/q3/delegate", DELEGATION)
    assert status == 201
    assert api(sub, "POST", "/v1/tasks", {"grant": issued["grant"]})[0] == 201
    assert api(sub, "POST", "/v1/tasks", {"grant": issued["grant"]})[0] == 409  # duplicate
    assert orch.alive() and sub.alive()


def test_task_cli(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", "task", *args], capture_output=True, text=True, timeout=60
        )

    assert run("keygen", "--out", str(tmp_path / "issuer")).returncode == 0
    (tmp_path / "task.yaml").write_text(
        "id: q4\nagent: spiffe://test.example/ns/a/sa/b\npurpose: p\nttl: 10m\n"
        "egress: [{host: a.internal, methods: [GET], paths: ['*']}]\n"
    )
    signed = run(
        "sign",
        "--key",
        str(tmp_path / "issuer" / "issuer.key"),
        "--task",
        str(tmp_path / "task.yaml"),
        "--out",
        str(tmp_path / "q4.jwt"),
    )
    assert signed.returncode == 0, signed.stderr
    from sidecar.grants.verify import GrantVerifier
    from sidecar.identity.state import parse_jwt_bundle

    keys = parse_jwt_bundle((tmp_path / "issuer" / "issuer.jwks.json").read_bytes())
    grant = GrantVerifier(root_keys=keys, root_ids=frozenset(), svids=None, max_depth=1).verify(
        (tmp_path / "q4.jwt").read_text().strip(), now=time.time()
    )
    assert grant.id == "q4" and grant.expires_at - grant.not_before == 600
    shown = run("inspect", str(tmp_path / "q4.jwt"))
    assert shown.returncode == 0 and "q4  sub=spiffe://test.example/ns/a/sa/b" in shown.stdout
    revoke = [*("revoke",), "--key", str(tmp_path / "issuer" / "issuer.key"), "--list", str(tmp_path / "rev.jwt")]
    assert run(*revoke[:1], "q4", *revoke[1:]).returncode == 0
    assert run(*revoke[:1], "q5", *revoke[1:]).returncode == 0
    assert "2 revoked ids (q4, q5)" in run(*revoke[:1], "q5", *revoke[1:]).stdout
    (tmp_path / "bad.yaml").write_text("id: x\n")
    bad = run("sign", "--key", str(tmp_path / "issuer" / "issuer.key"), "--task", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "Field required" in bad.stderr
    assert run("revoke", "q4").returncode == 2
    assert run("sign", "--key", str(tmp_path / "missing.key"), "--task", str(tmp_path / "task.yaml")).returncode == 2


def test_quarterly_report_scenario(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--scenario",
            "quarterly-report",
            "--state-dir",
            str(tmp_path / "q3"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "All 35 outcomes match" in result.stdout
    logs = {
        name: [json.loads(line) for line in (tmp_path / "q3" / name / "decisions.log").read_text().splitlines()]
        for name in ("orchestrator", "market-data", "sales-data", "filings")
    }
    # the hijacked sub-agent: frozen by the anomaly rule after its 5th out-of-task denial, with the evidence
    market = logs["market-data"]
    (frozen,) = [r for r in market if r["reason"] == "task_frozen"]
    probes = [r["decision_id"] for r in market if r["reason"].endswith("_not_allowed")]
    assert frozen["action"]["evidence"] == probes and len(probes) == 5
    assert frozen["action"]["target"] == "subtree:q3-risk-report/market-data"
    after = [r["reason"] for r in market if r["seq"] > frozen["seq"] and r["direction"] == "egress"]
    assert after == ["task_quarantined", "task_revoked"]  # frozen, then the root revocation
    assert not any(r["reason"] == "task_quarantined" for r in logs["filings"])  # its siblings kept working
    # the approval: required, granted with the CLI, used once, a replay refused
    orch = [r for r in logs["orchestrator"] if r["method"] == "DELETE" or r["reason"] == "approval_granted"]
    assert [r["reason"] for r in orch] == ["approval_required", "approval_granted", "allowed", "approval_replayed"]
    assert len({r["approval"]["id"] for r in orch[:3]}) == 1 and orch[2]["approval"]["status"] == "consumed"
    assert orch[1]["approval"]["approved_by"].startswith("key:")
    for name in ("orchestrator", "market-data", "sales-data", "filings"):
        verified = subprocess.run(
            [sys.executable, "-m", "sidecar", "logs", "verify", str(tmp_path / "q3" / name / "decisions.log")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "q3") not in ps
