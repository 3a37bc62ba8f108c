"""``agent-authz envoy`` (render, then exec Envoy) and the probe server (``listen.health``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from sidecar.harness import ManagedProcess, SidecarProcess, http_get, wait_until
from tests.support.config import base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e


def test_probe_server_relays_envoy_readiness_and_envoy_runs_by_exec(tmp_path: Path, short_dir: Path) -> None:
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    config["listen"]["health"] = "127.0.0.1:0"
    config["envoy"]["admin_port"] = 0
    path = write_config(tmp_path, config)
    sidecar = SidecarProcess(path, log_dir=tmp_path)
    sidecar.start()
    envoy: ManagedProcess | None = None
    try:
        addresses = sidecar.wait_ready()
        health = f"http://{addresses['health']}"
        status, body = http_get(health + "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})  # no identity or digest on the probe port
        assert http_get(health + "/healthz")[0] == 200
        assert http_get(health + "/metrics")[0] == 404 and http_get(health + "/v1/tasks")[0] == 404

        # Envoy's admin port is fixed in a pod; here: a free one, written back into the config
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            admin_port = probe.getsockname()[1]
        config["envoy"]["admin_port"] = admin_port
        write_config(tmp_path, config)
        status, body = http_get(health + "/envoy/ready")
        assert status == 503 and json.loads(body)["status"] == "envoy_unreachable"

        out = tmp_path / "run" / "envoy.json"
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "envoy",
            "--config",
            str(path),
            "--out",
            str(out),
            "--concurrency",
            "1",
        ]
        envoy = ManagedProcess("envoy", argv, log_dir=tmp_path)
        envoy.start()

        def ready() -> bool:
            envoy.check_alive()  # type: ignore[union-attr]
            return http_get(health + "/envoy/ready")[0] == 200

        wait_until(ready, timeout=30, what="envoy ready through the probe server")
        assert json.loads(out.read_text())["admin"]["address"]["socketAddress"]["portValue"] == admin_port
        assert envoy.proc is not None
        assert os.path.basename(os.readlink(f"/proc/{envoy.proc.pid}/exe")) == "envoy"  # the same PID: exec, no wrapper
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()


def test_envoy_command_reports_a_bad_config(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "sidecar.yaml"
    bad.write_text("issuer: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "envoy", "--config", str(bad), "--out", str(tmp_path / "e.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "agent-authz envoy:" in result.stderr and "issuer" in result.stderr
    assert not (tmp_path / "e.json").exists()
