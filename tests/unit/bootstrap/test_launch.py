"""``agent-authz envoy`` never starts Envoy at a log level that prints credentials (debug, trace)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sidecar.bootstrap.launch import ENVOY_LOG_LEVELS, envoy_argv
from sidecar.inject.settings import EnvoyContainerSettings

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("level", ENVOY_LOG_LEVELS)
def test_the_levels_that_print_no_header_are_accepted(level: str) -> None:
    argv = envoy_argv(Path("/bin/envoy"), Path("b.json"), concurrency=1, log_level=level, extra=["--drain-time-s", "1"])
    assert argv[argv.index("--log-level") + 1] == level


@pytest.mark.parametrize("level", ["debug", "trace", "DEBUG", ""])
def test_debug_and_trace_are_refused(level: str) -> None:
    with pytest.raises(ValueError, match="debug and trace print tokens"):
        envoy_argv(Path("/bin/envoy"), Path("b.json"), concurrency=1, log_level=level, extra=[])


@pytest.mark.parametrize("extra", [["-l", "debug"], ["--log-level=trace"], ["--component-log-level", "http:debug"]])
def test_extra_arguments_cannot_set_a_level(extra: list[str]) -> None:
    with pytest.raises(ValueError, match="may not set a log level"):
        envoy_argv(Path("/bin/envoy"), Path("b.json"), concurrency=1, log_level="info", extra=extra)


@pytest.mark.parametrize(
    "args", [["--log-level", "debug"], ["--log-level", "trace"], ["--", "--component-log-level", "router:trace"]]
)
def test_the_command_refuses_them_before_rendering(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "envoy.json"
    argv = [sys.executable, "-m", "sidecar", "envoy", "--config", str(tmp_path / "none.yaml"), "--out", str(out), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and not out.exists(), result.stderr


def test_the_webhook_and_the_chart_offer_the_same_levels() -> None:
    field = EnvoyContainerSettings.model_fields["log_level"]
    assert typing.get_args(field.annotation) == ENVOY_LOG_LEVELS
    schema = json.loads((REPO / "charts" / "agent-authz" / "values.schema.json").read_text())
    assert tuple(schema["properties"]["envoy"]["properties"]["logLevel"]["enum"]) == ENVOY_LOG_LEVELS
