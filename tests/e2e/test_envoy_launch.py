"""``agent-authz envoy`` (render, then exec Envoy), the probe server (``listen.health``), and where
``serve`` and ``envoy`` put their control sockets."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from sidecar.harness import ManagedProcess, SidecarProcess, http_get, wait_until
from tests.support.config import base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_envoy(tmp_path: Path, path: Path, health: str) -> ManagedProcess:
    argv = [sys.executable, "-m", "sidecar", "envoy", "--config", str(path), "--out", str(tmp_path / "run" / "e.json")]
    envoy = ManagedProcess("envoy", [*argv, "--concurrency", "1"], log_dir=tmp_path)
    envoy.start()

    def ready() -> bool:
        envoy.check_alive()
        return http_get(health + "/envoy/ready")[0] == 200

    try:
        wait_until(ready, timeout=30, what="envoy ready through the probe server")
    except BaseException:
        envoy.stop()
        raise
    return envoy


@pytest.mark.parametrize("admin", ["socket", "tcp"])
def test_probe_server_relays_envoy_readiness_and_envoy_runs_by_exec(
    tmp_path: Path, short_dir: Path, admin: str
) -> None:
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    config["listen"]["health"] = "127.0.0.1:0"
    ctl = short_dir / "ctl"  # missing: `agent-authz envoy` creates it 0700
    if admin == "socket":
        config["envoy"]["admin_socket"] = str(ctl / "envoy-admin.sock")
    else:  # Envoy's admin port is fixed in a pod; here: a free one
        config["envoy"].update(admin_socket=None, admin_port=_free_port())
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
        status, body = http_get(health + "/envoy/ready")
        assert status == 503 and json.loads(body)["status"] == "envoy_unreachable"
        status, body = http_get(health + "/proxy/ready")  # both, for the Envoy container's startupProbe
        assert (status, json.loads(body)) == (503, {"status": "envoy_unreachable"})

        envoy = _run_envoy(tmp_path, path, health)
        status, body = http_get(health + "/proxy/ready")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        bootstrap = json.loads((tmp_path / "run" / "e.json").read_text())["admin"]["address"]
        warning = "Envoy's admin is on TCP"
        if admin == "socket":
            assert bootstrap == {"pipe": {"path": str(ctl / "envoy-admin.sock"), "mode": 0o600}}
            assert stat.S_IMODE(ctl.stat().st_mode) == 0o700
            assert stat.S_IMODE((ctl / "envoy-admin.sock").stat().st_mode) == 0o600
            assert warning not in envoy.stderr_path.read_text()
        else:
            assert bootstrap["socketAddress"]["portValue"] == config["envoy"]["admin_port"]
            assert warning in envoy.stderr_path.read_text()
        assert envoy.proc is not None
        assert os.path.basename(os.readlink(f"/proc/{envoy.proc.pid}/exe")) == "envoy"  # the same PID: exec, no wrapper
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()


def test_envoy_started_before_the_sidecar_becomes_ready_once_the_sidecar_is_up(tmp_path: Path, short_dir: Path) -> None:
    """The pod starts both native sidecars side by side: Envoy may come first, before the sidecar's
    sockets exist, and must still reach ``/ready`` (and ``/proxy/ready``) once the sidecar is up."""
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    config["listen"]["health"] = "127.0.0.1:0"
    path = write_config(tmp_path, config)
    argv = [sys.executable, "-m", "sidecar", "envoy", "--config", str(path), "--out", str(tmp_path / "run" / "e.json")]
    envoy = ManagedProcess("envoy", [*argv, "--concurrency", "1"], log_dir=tmp_path)
    envoy.start()
    sidecar = SidecarProcess(path, log_dir=tmp_path)
    try:
        admin = short_dir / "envoy-admin.sock"
        wait_until(lambda: envoy.check_alive() or admin.exists(), timeout=30, what="Envoy's admin socket")
        assert not (short_dir / "authz.sock").exists()  # Envoy is up and the sidecar is not
        sidecar.start()
        health = f"http://{sidecar.wait_ready()['health']}"

        def both_ready() -> bool:
            envoy.check_alive()
            return http_get(health + "/proxy/ready")[0] == 200

        wait_until(both_ready, timeout=30, what="the sidecar and Envoy ready")
    finally:
        envoy.stop()
        sidecar.stop()


def test_envoy_refuses_an_admin_socket_directory_others_may_write(tmp_path: Path, short_dir: Path) -> None:
    import subprocess

    write_keys(tmp_path)
    shared = short_dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # another user could take the socket's name
    config = base_config(short_dir, [task()])
    config["envoy"]["admin_socket"] = str(shared / "envoy-admin.sock")
    path = write_config(tmp_path, config)
    out = tmp_path / "e.json"
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "envoy", "--config", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 2
        and "envoy.admin_socket" in result.stderr
        and "writable by group or others" in result.stderr
    )
    assert not out.exists()


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


def test_serve_puts_the_authz_socket_in_a_private_directory_and_warns_on_tcp(tmp_path: Path, short_dir: Path) -> None:
    import subprocess

    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    config["listen"]["authz"] = f"unix:{short_dir / 'ctl' / 'authz.sock'}"  # the directory is missing
    sidecar = SidecarProcess(write_config(tmp_path, config), log_dir=tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready()
        assert stat.S_IMODE((short_dir / "ctl").stat().st_mode) == 0o700
        assert stat.S_IMODE((short_dir / "ctl" / "authz.sock").stat().st_mode) == 0o600
        assert "control_endpoint_on_tcp" not in sidecar.stderr_path.read_text()
    finally:
        sidecar.stop()

    config["listen"]["authz"] = "127.0.0.1:0"  # explicitly TCP: served, with a warning naming the key
    tcp = SidecarProcess(write_config(tmp_path, config), log_dir=tmp_path, name="tcp")
    tcp.start()
    try:
        tcp.wait_ready()
        logged = tcp.stderr_path.read_text() + tcp.stdout_path.read_text()
        assert "control_endpoint_on_tcp" in logged and "listen.authz" in logged
    finally:
        tcp.stop()

    (short_dir / "open").mkdir(mode=0o777)
    (short_dir / "open").chmod(0o777)
    config["listen"]["authz"] = f"unix:{short_dir / 'open' / 'authz.sock'}"
    path = write_config(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "listen.authz" in result.stderr and "writable by group or others" in result.stderr
