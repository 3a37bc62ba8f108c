"""Helpers of the continuous-verification tests: an operator holding the root issuer key, who acts
through the real ``agent-authz`` CLI, and the sidecar's control API as anyone (the agent) can call it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Operator", "agent_attempts", "call_admin"]


def call_admin(
    url: str, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to a sidecar's admin server, no proxy: ``(status, decoded JSON body or text)``."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


class Operator:
    """The human operator: the root issuer key (``issuer/issuer.key`` of a
    :class:`~tests.support.grants_env.Scenario`) and an actions file the sidecars watch.

    Args:
        root: the scenario's directory.
        prefix: a command prefix for the CLI (e.g. ``setpriv`` to the agent's UID).
    """

    def __init__(self, root: Path, prefix: list[str] | None = None) -> None:
        self.key = root / "issuer" / "issuer.key"
        self.actions = root / "issuer" / "actions.jwt"
        self.prefix = prefix or []

    def cli(self, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """``agent-authz ARGS`` as a subprocess (never raises on a non-zero exit)."""
        argv = [*(self.prefix if prefix is None else prefix), sys.executable, "-m", "sidecar", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    def step(self, kind: str, target: str, *, admin: str | None = None, to_file: bool = True, reason: str = "") -> str:
        """``agent-authz task KIND TARGET --key ... [--list actions] [--admin URL]``; returns its stdout."""
        args = ["task", kind, target, "--key", str(self.key)]
        if to_file:
            args += ["--list", str(self.actions)]
        if admin:
            args += ["--admin", admin]
        if reason:
            args += ["--reason", reason]
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def approve(self, approval_id: str, admin: str, ttl: str | None = None) -> subprocess.CompletedProcess[str]:
        """``agent-authz approve ID --key ... --admin URL [--ttl T]``."""
        args = ["approve", approval_id, "--key", str(self.key), "--admin", admin]
        if ttl:
            args += ["--ttl", ttl]
        return self.cli(*args)


def agent_attempts(admin: str, approval_id: str, agent: str, replay: str) -> dict[str, list[Any]]:
    """What a hijacked agent can try against the control API without the operator's key: unsigned
    and self-signed actions, approvals and operator tokens, and the replay of an unfreeze it saw.

    Returns:
        attempt -> ``[HTTP status, error code]``.
    """
    import time

    from cryptography.hazmat.primitives.asymmetric import ec

    from sidecar.control.documents import ActionKind, Target, sign_action, sign_approval, sign_operator_token

    own = ec.generate_private_key(ec.SECP256R1())  # the agent's own key: no sidecar trusts it
    signed = {"issuer": "agent", "kid": "agent-key"}
    now = time.time()
    unfreeze = sign_action(ActionKind.UNFREEZE, Target.parse("subtree:t1"), own, at=now + 60, **signed)
    kill = sign_action(ActionKind.KILL, Target.parse(f"agent:{agent}"), own, at=now, **signed)
    approval = sign_approval(approval_id, own, audience=agent, ttl=600, now=now, **signed)
    token = sign_operator_token(own, audience=agent, now=now, lifetime=600, **signed)
    viewer = f"/decisions/api/approvals/{approval_id}"
    attempts = {
        "unsigned": call_admin(admin, "POST", "/v1/control/actions", "unfreeze subtree:t1"),
        "forged_unfreeze": call_admin(admin, "POST", "/v1/control/actions", unfreeze),
        "forged_kill": call_admin(admin, "POST", "/v1/control/actions", kill),
        "replayed_unfreeze": call_admin(admin, "POST", "/v1/control/actions", replay),
        "forged_approval": call_admin(admin, "POST", f"/v1/approvals/{approval_id}", approval),
        "viewer_no_token": call_admin(admin, "POST", viewer, "{}"),
        "viewer_forged_token": call_admin(admin, "POST", viewer, "{}", {"Authorization": f"Bearer {token}"}),
    }
    return {name: [status, body.get("error")] for name, (status, body) in attempts.items()}


if __name__ == "__main__":  # run as the agent's UID by tests/e2e/test_continuous.py
    print(json.dumps(agent_attempts(*sys.argv[1:5])))
