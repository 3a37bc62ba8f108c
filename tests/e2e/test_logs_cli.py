"""``agent-authz logs`` and ``logs verify`` as a person runs them, on generated chained logs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.log import DecisionLog
from sidecar.audit.reader import log_files
from sidecar.harness import wait_until

pytestmark = pytest.mark.e2e

A = "spiffe://test.example/ns/agents/sa/a"
B = "spiffe://test.example/ns/agents/sa/b"
CALLER = "spiffe://test.example/ns/ops/sa/scheduler"
_NOW = [time.time()]  # reset when a log is generated, so --since/--until margins hold in a long run


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "logs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin.decode() if stdin is not None else None,
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _records() -> list[dict[str, Any]]:
    """40 records over the last 40 minutes: two agents, three tasks, allows and denies, some with a caller."""
    out = []
    for i in range(40):
        deny = i % 4 == 0
        out.append(
            {
                "time": _iso(_NOW[0] - (40 - i) * 60),
                "decision_id": f"d{i:03d}",
                "direction": "ingress" if i % 5 == 0 else "egress",
                "agent": A if i % 2 else B,
                "caller": CALLER if i % 5 == 0 else None,
                "task_id": f"task-{i % 3}",
                "method": "GET",
                "host": "api.internal",
                "port": 80,
                "path": f"/v1/items/{i}",
                "decision": "deny" if deny else "allow",
                "reason": "path_not_allowed" if deny else "allowed",
                "status": 403 if deny else 200,
                "latency_us": 100 + i,
                "event": "decision",
            }
        )
    return out


@pytest.fixture
def log(tmp_path: Path) -> Path:
    _NOW[0] = time.time()
    path = tmp_path / "decisions.log"
    writer = DecisionLog(path, stdout=False, max_bytes=4096)  # several rotated files
    for record in _records():
        writer.append(record)
    writer.close()
    assert len(log_files(path)) >= 3
    return path


def _ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["decision_id"] for line in result.stdout.splitlines()]


def _expected(**match: Any) -> list[str]:
    return [r["decision_id"] for r in _records() if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], {}),
        (["--task", "task-1"], {"task_id": "task-1"}),
        (["--agent", A], {"agent": A}),
        (["--caller", CALLER], {"caller": CALLER}),
        (["--decision", "deny"], {"decision": "deny"}),
        (["--reason", "allowed", "--agent", B], {"reason": "allowed", "agent": B}),
    ],
)
def test_filters_across_rotated_files_in_chain_order(log: Path, args: list[str], match: dict[str, Any]) -> None:
    assert _ids(run(str(log), "--json", *args)) == _expected(**match)


def test_since_and_until(log: Path) -> None:
    recent = _ids(run(str(log), "--json", "--since", "10m30s"))
    assert recent == [f"d{i:03d}" for i in range(30, 40)]
    until = _iso(_NOW[0] - 35 * 60 + 1)
    assert _ids(run(str(log), "--json", "--until", until)) == [f"d{i:03d}" for i in range(6)]
    bad = run(str(log), "--since", "yesterday")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


def test_table_is_aligned_without_colour_off_a_terminal(log: Path) -> None:
    result = run(str(log), "--task", "task-0")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "DECISION", "REASON"] and "CALLER" in lines[0]
    assert len(lines) == 1 + len(_expected(task_id="task-0"))
    assert "\033[" not in result.stdout
    start = lines[0].index("REASON")
    assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:])


def test_a_copied_file_and_stdin_work(log: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copied-off-the-pod.log"
    copy.write_bytes(log.read_bytes())  # only the current file
    current = _ids(run(str(copy), "--json"))
    assert current and current == [json.loads(line)["decision_id"] for line in log.read_text().splitlines()]
    piped = b"".join(p.read_bytes() for p in log_files(log))
    assert _ids(run("--json", "--decision", "deny", stdin=piped)) == _expected(decision="deny")
    assert run(str(tmp_path / "absent.log")).returncode == 2


def test_verify_exit_codes_and_report(log: Path, tmp_path: Path) -> None:
    ok = run("verify", str(log))
    assert ok.returncode == 0 and "intact: 40 records" in ok.stdout
    copy = tmp_path / "copied.log"
    copy.write_bytes(log.read_bytes())
    alone = run("verify", str(copy))
    assert alone.returncode == 1 and "chain_start" in alone.stdout and "--partial" in alone.stdout
    assert run("verify", "--partial", str(copy)).returncode == 0
    lines = log.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["decision"] = "allow" if record["decision"] == "deny" else "deny"
    lines[2] = json.dumps(record).encode() + b"\n"
    log.write_bytes(b"".join(lines))
    broken = run("verify", "--json", str(log))
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["break"]["kind"] == "hash_mismatch" and report["break"]["line"] == 3
    assert report["break"]["file"] == str(log) and report["records"] == record["seq"]
    assert run("verify", "--expect", "nonsense", str(log)).returncode == 2


def test_follow_loses_nothing_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    writer = DecisionLog(path, stdout=False, max_bytes=4096)
    writer.append(_records()[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "logs", str(path), "--follow", "--json", "--decision", "allow"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []

        def reader_thread() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(json.loads(line)["decision_id"])

        thread = threading.Thread(target=reader_thread, daemon=True)
        thread.start()
        for record in _records()[1:30]:  # crosses several rotations
            writer.append(record)
        writer.close()
        expected = [r["decision_id"] for r in _records()[1:30] if r["decision"] == "allow"]
        wait_until(lambda: len(seen) >= len(expected), timeout=15, what="followed records")
        assert seen == expected
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
