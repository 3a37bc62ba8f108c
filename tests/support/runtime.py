"""Runtime helpers of the unit tests: a controllable clock, a runtime from files, egress requests, token claims."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt

from sidecar.decision import AuthzRequest, Direction
from sidecar.runtime import Runtime
from tests.support.config import API_HOST, ISSUER, base_config, write_config, write_keys

__all__ = ["Clock", "claims_of", "make_runtime", "make_task_rule", "req"]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_runtime(tmp_path: Path, tasks: list[dict[str, Any]], clock: Clock | None = None, **issuer: Any) -> Runtime:
    write_keys(tmp_path)
    config = base_config(tmp_path, tasks)
    config["issuer"].update(issuer)
    write_config(tmp_path, config)
    return Runtime(tmp_path / "sidecar.yaml", clock=clock or Clock())


def req(url_path: str = "/v1/items/1", method: str = "GET", host: str = API_HOST, **headers: str) -> AuthzRequest:
    return AuthzRequest(
        Direction.EGRESS, method, "http", host, url_path, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def claims_of(runtime: Runtime, decision: Any) -> dict[str, Any]:
    token = dict(decision.headers_to_set)["authorization"].removeprefix("Bearer ")
    key = jwt.PyJWKSet.from_dict(runtime.jwks())[jwt.get_unverified_header(token)["kid"]]
    # the fake clock runs ahead of real time: verify signature, audience and issuer, not time
    options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
    return jwt.decode(
        token, key.key, algorithms=["ES256", "EdDSA"], audience=decision.token.aud, issuer=ISSUER, options=options
    )


def make_task_rule(rule: Any) -> Any:
    """A compiled task with this anomaly rule (``QuarantineRule`` or ``None``) and nothing else."""
    from sidecar.config.schema import TaskSpec
    from sidecar.policy.compile import TaskSource, compile_policy

    spec = TaskSpec.model_validate({"id": "t", "agent": "spiffe://td/ns/a/sa/w", "purpose": "p", "ttl": 60})
    task = compile_policy([TaskSource(spec)], lambda _: 0.0, spec.agent).tasks_by_id["t"]
    from dataclasses import replace

    return replace(task, quarantine=rule)
