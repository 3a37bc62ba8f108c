"""What a multi-agent demo keeps while it runs: the stacks, each step's expected and observed outcome,
the problems found, and a client for each sidecar's admin API (the local task API)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.demo.common import GREEN, RED, color
from sidecar.harness import AuthzStack

__all__ = ["Step", "World", "admin", "print_steps"]


@dataclass
class Step:
    """One narrated action and whether its outcome was the expected one."""

    phase: str
    agent: str
    action: str
    expected: str
    got: str
    ok: bool


@dataclass
class World:
    """The demo's state directory, its running stacks (by agent name), the steps and the problems."""

    state: Path
    stacks: dict[str, AuthzStack] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self, phase: str, agent: str, action: str, expected: str, got: str) -> bool:
        """Add a step; a mismatch is also a problem. Returns whether ``got`` is ``expected``."""
        ok = expected == got
        self.steps.append(Step(phase, agent, action, expected, got, ok))
        if not ok:
            self.problems.append(f"{phase}: {agent} {action}: expected {expected}, got {got}")
        return ok


def admin(stack: AuthzStack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call ``stack``'s admin API (no proxy): ``(status, decoded JSON body)``; ``body`` is sent as
    JSON (a string as is). Raises ``OSError`` when the sidecar does not answer within 10 s."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(stack.sidecar.admin_url + path, data=data, method=method)  # noqa: S310 - http://127.0.0.1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read() or b"null")


def print_steps(world: World) -> None:
    """Print the steps as a table, one heading per phase."""
    phase = None
    for step in world.steps:
        if step.phase != phase:
            phase = step.phase
            print(f"\n{phase}")
        mark = color("ok", GREEN) if step.ok else color("MISMATCH", RED)
        print(f"  {step.agent:13} {step.action[:72]:72} {step.got:24} {mark}")
