"""Helpers shared by the demos: secrets on disk, colours, the sample agent as a subprocess, tables."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["GREEN", "RED", "color", "logs_command", "run_agent", "table", "wait_for_interrupt", "write_secret"]

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


def logs_command(*paths: Path, follow: bool = False) -> str:
    """The ``agent-authz logs`` command line showing ``paths`` (what the viewer shows, in a terminal)."""
    return shlex.join(["agent-authz", "logs", *(["-f"] if follow else []), *map(str, paths)])


def wait_for_interrupt(alive: Callable[[], bool]) -> None:
    """Block until SIGINT or SIGTERM, or until ``alive()`` is false (then say a component exited)."""
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(0.5):
            if not alive():
                print("a component exited; stopping")
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
