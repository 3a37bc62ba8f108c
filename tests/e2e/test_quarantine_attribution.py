"""What the anomaly rule counts, tried as a hijacked agent against a real sidecar process: probes
judged against no task (a CONNECT, a host no task names while the agent holds two tasks) and probes
spread over tasks the agent delegated to itself all count (docs/concepts/continuous-verification.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.harness import SidecarProcess
from tests.support.config import write_config
from tests.support.grants_env import ORCH, ROOT_TASK, Scenario, api, check, dump, reason

pytestmark = pytest.mark.e2e


def _orchestrator(tmp_path: Path, short_dir: Path, extra_roots: int = 0) -> tuple[SidecarProcess, Path]:
    """One sidecar holding the root grant q3 (and ``extra_roots`` more root grants of the same agent, ids
    q3-extra<i>) with the sidecar-wide anomaly rule: 2 strikes within 10 minutes freeze a task."""
    scenario = Scenario(tmp_path)
    sock_dir = short_dir / "o"
    sock_dir.mkdir()
    grants = [scenario.root_grant()]
    for i in range(extra_roots):
        grants.append(scenario.root_grant({**ROOT_TASK, "id": f"q3-extra{i}"}))
    path = scenario.agent_config("orch", ORCH, sock_dir, grants=grants)
    config = dump(path)
    config.update(quarantine={"threshold": 2, "window": "10m"}, state={"path": "state/state.db"})
    write_config(path.parent, config)
    proc = SidecarProcess(path, log_dir=tmp_path / "orch")
    proc.start()
    proc.wait_ready()
    return proc, sock_dir / "authz.sock"


@pytest.fixture
def started() -> Iterator[list[SidecarProcess]]:
    procs: list[SidecarProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


def _records(proc: SidecarProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(proc.log_dir) / "decisions.log").read_text().splitlines()]


def test_plain_http_probes_of_a_single_task_count(
    tmp_path: Path, short_dir: Path, started: list[SidecarProcess]
) -> None:
    proc, sock = _orchestrator(tmp_path, short_dir)
    started.append(proc)
    for i in range(2):
        assert reason(check(sock, f"evil{i}.example.com", "/exfiltrate")) == "host_not_allowed"
    assert reason(check(sock, "market.internal", "/v1/prices/ACME")) == "task_quarantined"


def test_connect_probes_to_outside_hosts_count(tmp_path: Path, short_dir: Path, started: list[SidecarProcess]) -> None:
    """``CONNECT evil.example.com:443`` (what an ``HTTPS_PROXY`` client sends first) is judged against
    no task; it counts against the agent's only task, and its record names it."""
    proc, sock = _orchestrator(tmp_path, short_dir)
    started.append(proc)
    for i in range(2):
        assert reason(check(sock, f"evil{i}.example.com:443", "", method="CONNECT")) == "host_not_allowed"
    connects = [r for r in _records(proc) if r.get("method") == "CONNECT"]
    assert [r.get("task_id") for r in connects] == ["q3"] * 2
    (frozen,) = [r for r in _records(proc) if r.get("reason") == "task_frozen"]
    assert frozen["action"]["evidence"] == [r["decision_id"] for r in connects]
    assert reason(check(sock, "market.internal", "/v1/prices/ACME")) == "task_quarantined"


def test_unnamed_probes_count_against_each_task_of_an_agent_holding_two(
    tmp_path: Path, short_dir: Path, started: list[SidecarProcess]
) -> None:
    proc, sock = _orchestrator(tmp_path, short_dir, extra_roots=1)
    started.append(proc)
    for i in range(2):
        assert reason(check(sock, f"evil{i}.example.com", "/exfiltrate")) == "host_not_allowed"
    probes = [r for r in _records(proc) if r.get("reason") == "host_not_allowed"]
    assert [r.get("task_id") for r in probes] == [None, None]  # two tasks: the record names neither
    frozen = sorted(r["action"]["target"] for r in _records(proc) if r.get("reason") == "task_frozen")
    assert frozen == ["subtree:q3", "subtree:q3-extra0"]
    for task_id in ("q3", "q3-extra0"):
        assert reason(check(sock, "market.internal", "/v1/prices/ACME", {"x-agent-task": task_id})) == (
            "task_quarantined"
        )


def test_self_delegation_does_not_reset_the_count(
    tmp_path: Path, short_dir: Path, started: list[SidecarProcess]
) -> None:
    """A hijacked agent delegates its task to itself (``POST /v1/tasks/q3/delegate`` with its own SPIFFE
    ID, then ``POST /v1/tasks`` of the grant) and probes once per child: each strike counts against
    the child and against q3, which the agent holds here too - q3 freezes at the second."""
    proc, sock = _orchestrator(tmp_path, short_dir)
    started.append(proc)
    children = []
    for i in range(2):
        request = {
            "subject": ORCH,  # itself
            "ttl": "10m",
            "name": f"self{i}",
            "max_calls": 0,
            "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/*"], "max_calls": 0}],
        }
        status, issued = api(proc, "POST", "/v1/tasks/q3/delegate", request)
        assert status == 201, issued
        status, body = api(proc, "POST", "/v1/tasks", issued["grant"])
        assert status == 201, body
        children.append(body["id"])
    for child in children:  # one out-of-task attempt per child (threshold 2)
        assert reason(check(sock, "evil.example.com", "/exfiltrate", {"x-agent-task": child})) == "host_not_allowed"
    frozen = [r["action"]["target"] for r in _records(proc) if r.get("reason") == "task_frozen"]
    assert frozen == ["subtree:q3"], frozen
    assert reason(check(sock, "market.internal", "/v1/prices/ACME", {"x-agent-task": "q3"})) == "task_quarantined"
    assert reason(check(sock, "market.internal", "/v1/prices/ACME", {"x-agent-task": children[0]})) == (
        "task_quarantined"
    )
