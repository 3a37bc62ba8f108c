"""Helpers shared by the demos: secrets on disk, colours, the sample agent as a subprocess, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["GREEN", "RED", "color", "run_agent", "table", "write_secret"]

GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def _short_id(decision_id: str) -> str:
    """The distinguishing tail of a decision id (its per-process counter), or ``-`` when there is none."""
    return f"…{decision_id[-8:]}" if decision_id else "-"


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (keys and API keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def color(text: str, code: str) -> str:
    """``text`` in colour ``code`` on a terminal, plain otherwise."""
    return f"{code}{text}{RESET}" if sys.stdout.isatty() else text


def run_agent(
    work: Path,
    proxy: str,
    calls: list[dict[str, Any]],
    name: str = "agent",
    *,
    trust: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the sample agent (:mod:`sidecar.demo.agent`) with ``HTTP_PROXY=proxy`` and ``calls``.

    With ``trust`` (the variables of :func:`sidecar.tls_intercept.trust.agent_trust_env`), also
    ``HTTPS_PROXY=proxy``: the agent's ``https://`` calls are intercepted, and it trusts the pod CA.

    Returns:
        One result per call: ``{"status", "decision_id", "reason", "body"}``.
    """
    calls_file = work / f"{name}-calls.json"
    calls_file.write_text(json.dumps(calls))
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["HTTP_PROXY"] = env["http_proxy"] = proxy
    if trust is not None:
        env["HTTPS_PROXY"] = env["https_proxy"] = proxy
        env.update(trust)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.agent", str(calls_file)],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]


def table(rows: list[tuple[str, str, str, str, str, str, bool]]) -> str:
    """Rows of (#, call, expected, got, decision id, why, ok) as aligned text."""
    cells = [("#", "call", "expected", "got", "decision", "why", "")]
    for number, call, expected, got, decision_id, note, ok in rows:
        short = call if len(call) <= 50 else call[:49] + "…"
        mark = color("ok", GREEN) if ok else color("MISMATCH", RED)
        cells.append((number, short, expected, got, _short_id(decision_id), note, mark))
    widths = [max(len(r[c]) for r in cells) for c in range(6)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(6)) + "  " + r[6] for r in cells)
