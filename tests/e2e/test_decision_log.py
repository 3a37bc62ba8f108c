"""The decision log through real Envoy: chain, restart, SIGTERM under load, full disk, dry-run, metrics."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.reader import iter_lines, iter_records, log_files
from sidecar.harness import http_get, wait_until
from tests.support.config import API_HOST, task
from tests.support.stack import Env, metric, readyz

pytestmark = pytest.mark.e2e

ITEMS = f"http://{API_HOST}/v1/items/1"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, input=stdin, timeout=60)


def all_records(env: Env) -> list[dict[str, Any]]:
    return list(iter_records(iter_lines(log_files(env.state / "decisions.log"))))


def verify(env: Env, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("logs", "verify", str(env.state / "decisions.log"), *extra)


def test_records_are_chained_and_metrics_move(env_factory: Callable[..., Env]) -> None:
    env = env_factory([task("t1", max_calls=10)])
    allowed = {"direction": "egress", "decision": "allow", "reason": "allowed"}
    assert metric(env, "agent_authz_decisions_total", **allowed) is None
    assert metric(env, "agent_authz_task_budget_remaining", task="t1") == 10
    assert metric(env, "agent_authz_svid_expiry_timestamp_seconds") is None  # issue 3 sets it; no fake value

    assert env.send("GET", ITEMS).status == 200
    assert env.send("GET", f"http://{API_HOST}/v1/items/2").status == 200
    assert env.send("GET", f"http://{API_HOST}/v1/nope").status == 403

    assert metric(env, "agent_authz_decisions_total", **allowed) == 2
    denied = {"direction": "egress", "decision": "deny", "reason": "path_not_allowed"}
    assert metric(env, "agent_authz_decisions_total", **denied) == 1
    assert metric(env, "agent_authz_decision_duration_seconds_count", reason="allowed") == 2
    assert metric(env, "agent_authz_tokens_minted_total") == 1
    assert metric(env, "agent_authz_tokens_served_from_cache_total") == 1
    assert metric(env, "agent_authz_task_budget_remaining", task="t1") == 8
    assert metric(env, "agent_authz_decision_log_healthy") == 1
    assert metric(env, "agent_authz_decision_log_seq") == 2

    records = all_records(env)
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[1]["prev_hash"] == records[0]["hash"]
    status, body = readyz(env)
    assert status == 200 and body["decision_log"]["seq"] == 2 and body["decision_log"]["hash"] == records[2]["hash"]
    result = verify(env, "--expect", f"2:{records[2]['hash']}")
    assert result.returncode == 0, result.stdout
    assert b"intact: 3 records" in result.stdout


def test_a_restart_continues_the_chain_and_the_viewer_keeps_history(env_factory: Callable[..., Env]) -> None:
    env = env_factory([task("t1")])
    first = env.send("GET", ITEMS)
    assert first.status == 200
    sidecar = env.stack.sidecar
    assert sidecar.stop() == 0  # SIGTERM: graceful
    sidecar.start()
    sidecar.wait_ready()
    wait_until(lambda: env.send("GET", ITEMS).status == 200, timeout=10, what="Envoy reconnects to the sidecar")
    records = all_records(env)
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert verify(env).returncode == 0
    status, body = http_get(env.admin + "/decisions/api/records?limit=50")
    ids = [r["decision_id"] for r in json.loads(body)["records"]]
    assert status == 200 and first.decision_id in ids  # written by the previous process


@pytest.mark.parametrize("fsync", [False, True], ids=["write", "fsync-group-commit"])
def test_every_answered_decision_survives_sigterm_under_load(env_factory: Callable[..., Env], fsync: bool) -> None:
    env = env_factory([task("t1")], mutate=lambda c, _: c["decision_log"].update(fsync=fsync))
    total, workers = 800, 24
    answered: list[str] = []
    outcomes: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        url = ITEMS if i % 3 else f"http://{API_HOST}/v1/denied/{i}"
        try:
            reply = env.send("GET", url)
        except OSError:
            status, decision_id = -1, None
        else:
            status, decision_id = reply.status, reply.decision_id
        with lock:
            outcomes.append(status)
            if decision_id:
                answered.append(decision_id)

    proc = env.stack.sidecar.proc
    assert proc is not None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(call, i) for i in range(total)]
        wait_until(lambda: len(answered) >= 100, timeout=30, what="load under way")
        proc.send_signal(signal.SIGTERM)
        for future in futures:
            future.result(timeout=60)
    assert proc.wait(timeout=15) == 0
    recorded = {r["decision_id"] for r in all_records(env)}
    missing = set(answered) - recorded
    assert not missing, f"{len(missing)} answered decisions have no record"
    assert len(answered) >= 100
    assert outcomes.count(503) > 0, "the sidecar stopped only after the load ended"  # really mid-load
    assert verify(env).returncode == 0


@pytest.fixture
def tiny_fs(short_dir: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = short_dir / "logfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass  # ENOSPC: the filesystem is full
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_full_disk_fails_closed_and_flips_readiness(
    env_factory: Callable[..., Env], tiny_fs: Path, policy: str
) -> None:
    log_path = tiny_fs / "decisions.log"

    def configure(config: dict[str, Any], _port: int) -> None:
        config["decision_log"].update(path=str(log_path), on_log_failure=policy)

    env = env_factory([task("t1")], mutate=configure)
    assert env.send("GET", ITEMS).status == 200
    filler = _fill(tiny_fs)

    # The log's last page still has room; the first record that needs a new page cannot be written.
    for _ in range(40):
        before = len(env.upstream.requests())
        reply = env.send("GET", ITEMS)
        if readyz(env)[0] == 503:
            break
        assert reply.status == 200
    else:
        pytest.fail("the decision log never hit the full filesystem")
    if policy == "deny":
        assert reply.status == 403 and reply.reason == "internal_error"
        assert len(env.upstream.requests()) == before  # nothing left the pod
    else:
        assert reply.status == 200 and len(env.upstream.requests()) == before + 1
    assert env.send("GET", f"http://{API_HOST}/v1/nope").reason == "path_not_allowed"  # a deny stays a deny
    status, body = readyz(env)
    assert status == 503 and body["decision_log"]["healthy"] is False
    assert "No space left" in body["decision_log"]["error"]
    assert metric(env, "agent_authz_decision_log_healthy") == 0
    assert (metric(env, "agent_authz_decision_log_write_errors_total", sink="file") or 0) >= 2
    events = [json.loads(line) for line in env.stack.sidecar.stderr_path.read_text().splitlines()]
    failures = [e for e in events if e.get("event") == "decision_log_write_failed"]
    assert any(e["record"]["decision_id"] == reply.decision_id for e in failures)  # not dropped silently
    assert env.stack.sidecar.alive()

    filler.unlink()
    assert env.send("GET", ITEMS).status == 200
    assert readyz(env)[0] == 200
    assert metric(env, "agent_authz_decision_log_healthy") == 1
    result = run_cli("logs", "verify", str(log_path))
    assert result.returncode == 0, result.stdout  # failed writes left no torn or half-chained record
    assert reply.decision_id not in {r["decision_id"] for r in iter_records(iter_lines([log_path]))}


def test_dry_run_lets_denied_calls_through_and_records_the_would_be_decision(
    env_factory: Callable[..., Env],
) -> None:
    env = env_factory([task("t1")], mutate=lambda c, _: c.update(dry_run=True))
    assert readyz(env)[1]["dry_run"] is True
    denied = env.send("GET", "http://other.internal/v1/x", {"Authorization": "Bearer agent-secret"})
    assert denied.status == 200
    (received,) = [r for r in env.upstream.requests() if r.host == "other.internal"]
    assert "authorization" not in received.headers  # the agent's credential is still stripped
    record = env.record(denied.decision_id)
    assert record["decision"] == "allow" and record["reason"] == "dry_run" and record["dry_run"] is True
    assert record["would_decision"] == "deny" and record["would_reason"] == "host_not_allowed"
    assert record["token"] is None

    allowed = env.send("GET", ITEMS)
    assert allowed.status == 200  # the upstream verified the injected token
    record = env.record(allowed.decision_id)
    assert record["would_decision"] == "allow" and record["token"]["aud"] == "https://api.internal"
    labels = {"direction": "egress", "reason": "host_not_allowed"}
    assert metric(env, "agent_authz_dry_run_would_deny_total", **labels) == 1
    assert metric(env, "agent_authz_dry_run") == 1


def test_hmac_chain_and_rotation_through_the_sidecar(env_factory: Callable[..., Env], tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "log-hmac.key"

    def configure(config: dict[str, Any], _port: int) -> None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_hex(32) + "\n")
        config["decision_log"].update(hmac_key_file="keys/log-hmac.key", rotate={"max_bytes": "4KiB"})

    env = env_factory([task("t1")], mutate=configure)
    for i in range(25):
        env.send("GET", f"http://{API_HOST}/v1/items/{i}")
    files = log_files(env.state / "decisions.log")
    assert len(files) >= 3
    assert metric(env, "agent_authz_decision_log_rotations_total") == len(files) - 1
    assert verify(env, "--key", str(key_file)).returncode == 0
    assert verify(env).returncode == 1  # plain SHA-256 does not match an HMAC chain

    def chain() -> dict[str, Any]:
        return json.loads(http_get(env.admin + "/decisions/api/chain", timeout=30)[1])

    status = chain()
    assert status["status"] == "intact" and status["records"] == 25 and status["head_seq"] == 24

    # Remove the newest record from the end of the current file: only the known head can tell.
    current = files[-1]
    lines = current.read_bytes().splitlines(keepends=True)
    current.write_bytes(b"".join(lines[:-1]))
    assert verify(env, "--key", str(key_file)).returncode == 0  # the chain alone looks fine
    broken = wait_until(
        lambda: (s := chain())["status"] == "broken" and s, timeout=20, what="viewer reports the cut", interval=0.5
    )
    assert broken["break"]["kind"] == "truncated_end"
