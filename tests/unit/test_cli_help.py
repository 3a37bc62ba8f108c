"""``agent-authz --help`` lists every command the CLI accepts, and nothing hidden."""

from __future__ import annotations

import re

from sidecar import cli
from sidecar.cli import build_parser


def _documented_commands() -> set[str]:
    return set(re.findall(r"^    ``([a-z-]+)``", cli.__doc__ or "", re.MULTILINE))


def test_help_lists_every_command_and_no_hidden_one() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    accepted = set(sub.choices) - {"logs-verify"}  # type: ignore[arg-type]
    listed = {a.dest for a in sub._get_subactions()}
    assert listed == accepted
    assert accepted == _documented_commands()
    text = parser.format_help()
    assert "SUPPRESS" not in text
    assert "logs-verify" not in text
    for name in accepted:
        assert re.search(rf"^\s+{re.escape(name)}\b", text, re.MULTILINE), name
