"""envoy/bootstrap.example.json is what the renderer produces for examples/sidecar.yaml, and Envoy accepts it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sidecar.bootstrap.render import render_bootstrap_json
from sidecar.config.loader import load_config
from sidecar.envoy_bin import find_envoy

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_example_bootstrap_is_current() -> None:
    rendered = render_bootstrap_json(load_config(REPO / "examples" / "sidecar.yaml"))
    committed = (REPO / "envoy" / "bootstrap.example.json").read_text()
    assert json.loads(rendered) == json.loads(committed), "regenerate: see envoy/README.md"


def test_example_bootstrap_validates_with_envoy() -> None:
    result = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(REPO / "envoy" / "bootstrap.example.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
