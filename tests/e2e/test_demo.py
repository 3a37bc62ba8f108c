"""``agent-authz demo``: the main job in one command, green, and leaving nothing behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie would still answer; our children are reaped, so check /proc state too
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_demo_runs_green_and_reaps_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All 15 outcomes match the task and the ingress policy" in result.stdout
    records = [json.loads(line) for line in (state / "decisions.log").read_text().splitlines()]
    # 11 egress calls, the 3 CONNECT tunnels urllib opens for them (one per HTTPS call: each a decision),
    # 3 ingress calls (the 4th fails the TLS handshake)
    assert len(records) == 17
    assert [r["host"] for r in records if r["method"] == "CONNECT"] == ["sentiment.example.com"] * 3
    assert {r["reason"] for r in records} >= {
        "allowed",
        "path_not_allowed",
        "budget_exhausted",
        "host_not_allowed",
        "caller_not_allowed",
    }
    # the paid API is called over HTTPS: the agent's TLS intercepted, the key injected inside it
    paid = [r for r in records if r["host"] == "sentiment.example.com" and r["method"] != "CONNECT"]
    assert all(r["connect"] == "sentiment.example.com:443" for r in paid)  # each inside its decided tunnel
    assert [(r["reason"], r.get("tls"), r["sni"]) for r in paid] == [
        ("allowed", "intercept", "sentiment.example.com"),
        ("allowed", "intercept", "sentiment.example.com"),
        ("budget_exhausted", "intercept", "sentiment.example.com"),
    ]
    assert "x-api-key injected: yes, received over HTTPS" in result.stdout
    # each table row names its own decision, as found in the log
    shown = re.findall(r"\s(…[0-9a-f]{8})\s", result.stdout)
    assert len(shown) == 14 and len(set(shown)) == 14, shown  # the calls (the tunnels are not rows)
    logged = {r["decision_id"][-8:] for r in records if r["method"] != "CONNECT"}
    assert {cell[1:] for cell in shown} == logged
    assert {r["caller"] for r in records if r["direction"] == "ingress"} == {
        "spiffe://demo.agent-authz.local/ns/finance/sa/orchestrator",
        "spiffe://demo.agent-authz.local/ns/marketing/sa/campaign-bot",
    }
    sidecar_pid = json.loads((state / "sidecar.ready.json").read_text())["pid"]
    assert not _pid_alive(sidecar_pid)
    envoy_admin = (state / "envoy.admin").read_text().strip()
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(state) not in ps, ps
    assert envoy_admin  # Envoy was really started

    # Done when: the demo's decisions can be shown and verified.
    log = str(state / "decisions.log")
    shown = subprocess.run([sys.executable, "-m", "sidecar", "logs", log], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("TIME") and len(lines) == 18  # header + 17 records
    assert sum("budget_exhausted" in line for line in lines) == 1
    verified = subprocess.run(
        [sys.executable, "-m", "sidecar", "logs", "verify", log], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0 and "intact: 17 records" in verified.stdout, verified.stdout
    assert [r["seq"] for r in records] == list(range(17))


def test_keep_running_prints_the_viewer_url_and_the_cli_equivalent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--state-dir", str(state), "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()], daemon=True)
    reader.start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not output or not output[-1].lstrip().startswith("Envoy admin:"):
            output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        text = "".join(output)
        (url,) = re.findall(r"^  Decision viewer: (http://127\.0\.0\.1:\d+/decisions)$", text, re.M)
        cli = f"  The same in a terminal: agent-authz logs -f {state / 'decisions.log'}\n"
        assert cli in text, text
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as page:
            assert page.status == 200 and b"delegation trees" in page.read()
        with opener.open(url + "/api/records", timeout=10) as answer:
            assert len(json.loads(answer.read())["records"]) == 17  # with the 3 CONNECT decisions
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
        reader.join(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()
    assert demo.returncode == 0, "".join(output)
    assert str(state) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
