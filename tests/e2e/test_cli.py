"""The ``agent-authz`` command: exit codes, error messages and the rendered Envoy config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.envoy_bin import find_envoy
from tests.conftest import API_HOST, base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    return write_config(tmp_path, base_config(tmp_path, [task()], {API_HOST: "127.0.0.1:9"}))


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--url", f"http://{API_HOST}/v1/items/1"], 0, "allow allowed"),
        (["--url", f"http://{API_HOST}/v1/other"], 1, "deny path_not_allowed"),
        (["--url", f"http://{API_HOST}/v1/items/1", "--method", "POST"], 1, "deny method_not_allowed"),
        (["--url", f"http://{API_HOST}/v1/items/1", "--task", "ghost"], 1, "deny unknown_task"),
        (["--url", f"http://{API_HOST}/v1/items/a;b"], 1, "deny bad_request"),
        (["--url", "not-a-url"], 2, "absolute http(s) URL"),
        (["--url", f"http://{API_HOST}/", "--header", "no-colon"], 2, "--header"),
    ],
)
def test_check_exit_codes(config: Path, args: list[str], code: int, text: str) -> None:
    result = run("check", "--config", str(config), *args)
    assert result.returncode == code, result.stderr
    assert text in result.stdout + result.stderr


def test_check_json(config: Path) -> None:
    result = run("check", "--config", str(config), "--url", f"http://{API_HOST}/v1/items/1", "--json")
    data = json.loads(result.stdout)
    assert data["decision"] == "allow" and data["token"]["aud"] == "https://api.internal"
    assert "eyJ" not in result.stdout


def test_check_bad_config_is_exit_2_with_file_field_reason(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("agent: spiffe://x.org/a\nissuer: {url: u, signing_key: k.pem}\ntasks: [{id: t}]\n")
    result = run("check", "--config", str(path), "--url", "http://h/")
    assert result.returncode == 2
    assert f"{path}: tasks[0].agent: Field required" in result.stderr


def test_serve_refuses_unreadable_key(tmp_path: Path, config: Path) -> None:
    (tmp_path / "keys" / "signing.pem").write_text("garbage")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "issuer.signing_key" in result.stderr and "not an unencrypted PEM private key" in result.stderr


def test_serve_refuses_missing_config(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_envoy_config_validates_with_real_envoy(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    result = run("envoy-config", "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    validate = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert "OK" in validate.stdout + validate.stderr


def test_rendered_config_enforces_fail_closed_and_path_normalization(config: Path) -> None:
    bootstrap = json.loads(run("envoy-config", "--config", str(config)).stdout)
    listener = bootstrap["staticResources"]["listeners"][0]
    hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
    assert hcm["normalizePath"] is True and hcm["mergeSlashes"] is True
    assert hcm["pathWithEscapedSlashesAction"] == "REJECT_REQUEST"
    ext_authz = hcm["httpFilters"][0]
    assert ext_authz["name"] == "envoy.filters.http.ext_authz"
    assert not ext_authz["typedConfig"].get("failureModeAllow", False)
    assert ext_authz["typedConfig"]["grpcService"]["timeout"] == "0.250s"
    for vhost in hcm["routeConfig"]["virtualHosts"]:
        ctx = vhost["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]["contextExtensions"]
        assert ctx == {"direction": "egress"}
    assert bootstrap["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
