"""Hot reload, expiry and revocation through real Envoy, without restarting anything."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.harness import http_get, wait_until
from tests.support.config import API_HOST, task
from tests.support.stack import Env, metric_total, readyz

pytestmark = pytest.mark.e2e


def _status_becomes(env: Env, url: str, status: int, timeout: float = 10.0) -> None:
    wait_until(lambda: env.send("GET", url).status == status, timeout=timeout, what=f"{url} -> {status}")


def test_reload_adds_and_removes_a_rule_and_keeps_config_on_invalid_file(env_factory: Any) -> None:
    env: Env = env_factory([task("t1")])
    pid = env.stack.sidecar.proc.pid  # type: ignore[union-attr]
    extra = f"http://{API_HOST}/v1/reports/q3"
    assert env.send("GET", extra).reason == "path_not_allowed"

    env.rewrite(lambda c: c["tasks"][0]["egress"][0]["paths"].append("/v1/reports/*"))
    _status_becomes(env, extra, 200)

    good = (env.state / "sidecar.yaml").read_text()
    (env.state / "sidecar.yaml").write_text(good.replace("methods:", "methodz:"))
    wait_until(
        lambda: "config_reload_failed" in env.stack.sidecar.stderr_path.read_text(),
        timeout=10,
        what="reload failure logged",
    )
    assert env.send("GET", extra).status == 200  # the last good config is still active
    _, body = http_get(env.stack.sidecar.admin_url + "/readyz")
    assert "methodz" in json.loads(body)["last_reload_error"]
    failure = [
        json.loads(line)
        for line in env.stack.sidecar.stderr_path.read_text().splitlines()
        if "config_reload_failed" in line
    ][-1]
    assert failure["level"] == "error" and failure["field"].startswith("tasks[0].egress[0]")

    env.rewrite(lambda c: c["tasks"][0]["egress"][0]["paths"].remove("/v1/reports/*"))
    _status_becomes(env, extra, 403)
    assert env.stack.sidecar.proc.pid == pid and env.stack.sidecar.alive()  # type: ignore[union-attr]


def _failures_logged(env: Env) -> int:
    return env.stack.sidecar.stderr_path.read_text().count('"config_reload_failed"')


def test_writes_next_to_an_invalid_config_cause_no_more_failures_and_restoring_it_clears_readyz(
    env_factory: Any,
) -> None:
    """Two bugs seen from outside: while sidecar.yaml was invalid, every write to another file in its
    directory (a log next to it) reparsed it and logged another config_reload_failed (~24/s, forever);
    and restoring the byte-identical good file left the stale last_reload_error in /readyz."""
    env: Env = env_factory([task("t1")])
    config = env.state / "sidecar.yaml"
    good = config.read_bytes()
    config.write_bytes(good.replace(b"methods:", b"methodz:"))
    wait_until(lambda: metric_total(env, "agent_authz_config_reload_failures_total") == 1, timeout=10, what="failure")
    neighbour = env.state / "agent.log"
    for i in range(20):  # a log written next to the config, about ten lines a second
        with neighbour.open("a") as handle:
            handle.write(f"line {i}\n")
        time.sleep(0.1)
    # a second, different invalid version: the only other failure there may be (events arrive in order)
    config.write_bytes(good.replace(b"methods:", b"methodx:"))
    wait_until(lambda: metric_total(env, "agent_authz_config_reload_failures_total") >= 2, timeout=10, what="2nd")
    assert metric_total(env, "agent_authz_config_reload_failures_total") == 2
    assert _failures_logged(env) == 2
    assert "methodx" in readyz(env)[1]["last_reload_error"]

    config.write_bytes(good)  # byte-identical to the active configuration
    wait_until(lambda: readyz(env)[1]["last_reload_error"] is None, timeout=10, what="stale error cleared")
    assert metric_total(env, "agent_authz_config_reloads_total") == 0  # nothing was rebuilt
    assert _failures_logged(env) == 2
    assert env.send("GET", f"http://{API_HOST}/v1/items/1").status == 200


def test_kubernetes_configmap_symlink_swap(env_factory: Any, tmp_path: Path) -> None:
    env: Env = env_factory([task("t1")])
    # Re-point the running sidecar? It watches its own file: lay the ConfigMap out around that file.
    state = env.state
    real = yaml.safe_load((state / "sidecar.yaml").read_text())
    real["issuer"]["signing_key"] = str(state / "keys/signing.pem")
    real["issuer"]["next_signing_key"] = str(state / "keys/next.pem")
    real["decision_log"]["path"] = str(state / "decisions.log")

    def publish(version: str, config: dict[str, Any]) -> None:
        data = state / f"..{version}"
        data.mkdir()
        (data / "sidecar.yaml").write_text(yaml.safe_dump(config))
        tmp_link = state / "..data_tmp"
        tmp_link.symlink_to(data.name)
        os.replace(tmp_link, state / "..data")  # the atomic swap kubelet does

    publish("v1", real)
    os.replace(state / "..data" / "sidecar.yaml", state / "..v1" / "sidecar.yaml")
    link = state / "sidecar.yaml.link"
    link.symlink_to("..data/sidecar.yaml")
    os.replace(link, state / "sidecar.yaml")  # sidecar.yaml -> ..data/sidecar.yaml
    url = f"http://{API_HOST}/v1/reports/q3"
    _status_becomes(env, f"http://{API_HOST}/v1/items/1", 200)
    assert env.send("GET", url).status == 403

    real["tasks"][0]["egress"][0]["paths"].append("/v1/reports/*")
    publish("v2", real)
    _status_becomes(env, url, 200)


def test_expiry_is_honoured(env_factory: Any) -> None:
    """A minted token never outlives its task, and the task's end is honoured on the next call (the
    end is moved close only once the first call passed: a busy machine's start-up cannot eat it)."""
    expires = (datetime.now(UTC) + timedelta(seconds=90)).replace(microsecond=0)
    env: Env = env_factory([task("short", ttl=None, expires_at=expires.isoformat())])  # max_token_ttl 5m
    url = f"http://{API_HOST}/v1/items/1"
    first = env.send("GET", url)
    assert first.status == 200
    token_exp = env.record(first.decision_id)["token"]["exp"]
    assert token_exp == expires.timestamp()  # capped at the task's end, not the issuer's 5 minutes
    soon = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    env.rewrite(lambda c: c["tasks"][0].update(expires_at=soon.isoformat()))
    wait_until(lambda: env.send("GET", url).reason == "task_expired", timeout=15, what="task_expired")


def test_revocation_takes_effect_on_next_request(env_factory: Any) -> None:
    env: Env = env_factory([task("t1")])
    url = f"http://{API_HOST}/v1/items/1"
    assert env.send("GET", url).status == 200
    env.rewrite(lambda c: c["tasks"][0].update(revoked=True))
    wait_until(lambda: env.send("GET", url).reason == "task_revoked", timeout=10, what="task_revoked")


def test_ext_authz_unavailable_fails_closed(env_factory: Any) -> None:
    env: Env = env_factory([task("t1")])
    url = f"http://{API_HOST}/v1/items/1"
    assert env.send("GET", url).status == 200
    before = len(env.upstream.requests())
    env.stack.sidecar.stop()
    reply = env.send("GET", url)
    assert reply.status == 503
    assert len(env.upstream.requests()) == before
