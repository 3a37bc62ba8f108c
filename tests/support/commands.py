"""Command lines the chart and the webhook put in pods, checked against the CLI the image installs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from sidecar.cli import build_parser

__all__ = ["REPO", "parses"]

REPO = Path(__file__).resolve().parents[2]


def parses(argv: list[str]) -> None:
    """``argv`` is an ``agent-authz`` command line the CLI accepts (the image's entry point)."""
    assert argv[0] == "agent-authz", argv
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agent-authz"] == "sidecar.cli:main"
    build_parser().parse_args(argv[1:])  # SystemExit on an unknown command or flag
