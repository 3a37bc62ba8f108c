"""The task API serves the local agent only: its own tasks, its own authority, and no 500 for junk.

The admin application runs on a real aiohttp server (a thread with its own event loop, loopback
port) over a runtime holding three kinds of tasks: a grant delegated to this agent (``q3/market``,
which it may give up), a task of its own from the configuration (its operator revokes it) and
another agent's task from the same configuration. Whoever calls the task API is taken to be the
local agent - possibly hijacked - so every call is held to what the agent's signature could do.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.admin.app import make_admin_app
from sidecar.audit.log import DecisionLog
from sidecar.grants.issue import DelegationRequest
from sidecar.metrics import Metrics
from sidecar.runtime import Runtime, TaskService
from tests.support.config import write_config
from tests.support.grants_env import ORCH, OTHER, ROOT_TASK, SUB, Scenario, dump

OWN_CONFIG_TASK = {"id": "own-config", "agent": SUB, "purpose": "own", "ttl": "1h", "egress": []}
OTHERS_TASK = {
    "id": "others",
    "agent": OTHER,
    "purpose": "another agent's",
    "on_behalf_of": "user:someone-else@example.com",
    "ttl": "1h",
    "egress": [],
}
DELEGATION = {
    "subject": SUB,
    "ttl": "10m",
    "name": "market",
    "max_calls": 5,
    "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/ACME/*"], "max_calls": 5}],
}


@dataclass
class Api:
    port: int
    runtime: Runtime
    log_path: Path
    published: Path

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body)
            reply = conn.getresponse()
            data = reply.read()
        finally:
            conn.close()
        try:
            return reply.status, json.loads(data)
        except ValueError:
            return reply.status, data

    def records(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


def _serve(app: web.Application, started: threading.Event, box: dict[str, Any]) -> None:
    loop = asyncio.new_event_loop()
    box["loop"] = loop
    runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["port"] = runner.addresses[0][1]
        started.set()

    loop.run_until_complete(start())
    loop.run_forever()
    loop.run_until_complete(runner.cleanup())
    loop.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("tasks-api")
    sc = Scenario(root)
    orch = TaskService(Runtime(sc.agent_config("orch", ORCH, root, grants=[sc.root_grant()], publish=True)))
    grant, _ = orch.delegate("q3", DelegationRequest.model_validate(DELEGATION))
    path = sc.agent_config("sub", SUB, root / "sub-sock", publish=True)
    config = dump(path)
    config["tasks"] = [OWN_CONFIG_TASK, OTHERS_TASK]
    write_config(path.parent, config)
    runtime = Runtime(path)
    tasks = TaskService(runtime)
    tasks.accept(grant)
    log = DecisionLog(path.parent / "decisions.log", stdout=False)
    app = make_admin_app(runtime, log, Metrics(), tasks=tasks)
    started, box = threading.Event(), {}
    thread = threading.Thread(target=_serve, args=(app, started, box), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield Api(box["port"], runtime, path.parent / "decisions.log", path.parent / "revocations.jwt")
    finally:
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        thread.join(10)
        log.close()


def test_the_list_shows_only_the_local_agents_tasks(api: Api) -> None:
    status, body = api.call("GET", "/v1/tasks")
    assert status == 200 and body["agent"] == SUB
    assert [t["id"] for t in body["tasks"]] == ["own-config", "q3/market"]
    assert "others" in api.runtime.snapshot.policy.tasks_by_id  # held here, just not shown
    assert "someone-else" not in json.dumps(body)


@pytest.mark.parametrize(
    ("action", "task_id", "detail"),
    [
        ("revoke", "others", "is not this agent's"),
        ("revoke", "own-config", "comes from the configuration"),
        ("delegate", "others", "is not this agent's to delegate"),
    ],
)
def test_no_authority_is_a_403_with_a_decision_record(api: Api, action: str, task_id: str, detail: str) -> None:
    body = json.dumps({**DELEGATION, "name": "x"}).encode() if action == "delegate" else None
    status, reply = api.call("POST", f"/v1/tasks/{task_id}/{action}", body)
    assert status == 403 and reply["error"] == "not_authorized" and detail in reply["detail"], reply
    (record,) = [r for r in api.records() if r["decision_id"] == reply["decision_id"]]
    assert (record["direction"], record["decision"], record["reason"], record["status"]) == (
        "local",
        "deny",
        "not_authorized",
        403,
    )
    assert (record["task_id"], record["agent"], record["method"]) == (task_id, SUB, "POST")
    assert record["path"] == f"/v1/tasks/{task_id}/{action}"
    # nothing changed: not revoked, not published, nothing reserved
    assert not api.runtime.snapshot.policy.tasks_by_id[task_id].revoked
    assert task_id not in api.runtime.carried.own_revoked and not api.published.exists()
    assert api.runtime.budgets.used((task_id, "")) == 0


def test_unknown_tasks_stay_404(api: Api) -> None:
    assert api.call("POST", "/v1/tasks/nope/revoke")[0] == 404
    assert api.call("POST", "/v1/tasks/nope/delegate", json.dumps(DELEGATION).encode())[0] == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/tasks/q3/market/delegate", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/tasks/q3/market/delegate", b'{"subject": ' * 5000 + b"1" + b"}" * 5000),
        ("/v1/tasks/q3/market/delegate", b"\xff\xfe not utf-8"),
        ("/v1/tasks/q3/market/delegate", b"{broken"),
        ("/v1/tasks/q3/market/delegate", b'"just a string"'),
        ("/v1/tasks", b'{"grant": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/v1/tasks", b'{"grant": {"nested": true}}'),
        ("/v1/tasks", b"\xc3\x28"),
        ("/v1/tasks", b"[1, 2]"),
    ],
    ids=["deep-array", "deep-object", "not-utf8", "broken", "string", "deep-grant", "grant-object", "bad-utf8", "list"],
)
def test_malformed_or_deeply_nested_bodies_are_400(api: Api, path: str, body: bytes) -> None:
    status, reply = api.call("POST", path, body)
    assert status == 400 and reply["error"] in ("bad_request", "grant_malformed"), reply  # a non-JSON body is a JWS


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)
_delegation_like = st.fixed_dictionaries(
    {"subject": st.one_of(st.just(SUB), st.text(max_size=30)), "ttl": st.one_of(st.just("5m"), _json)},
    optional={"name": _json, "max_calls": _json, "egress": st.lists(_json, max_size=3), "purpose": _json},
)
_bodies = st.one_of(
    st.binary(max_size=512),
    _json.map(lambda v: json.dumps(v).encode()),
    _delegation_like.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
)
_targets = st.sampled_from(
    ["/v1/tasks", "/v1/tasks/q3/market/delegate", "/v1/tasks/others/delegate", "/v1/tasks/nope/revoke"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=_targets, body=_bodies)
def test_junk_never_gets_a_500(api: Api, target: str, body: bytes) -> None:
    status, reply = api.call("POST", target, body)
    assert status < 500, (status, reply)
    if status >= 400:
        assert isinstance(reply, dict) and reply["error"], reply
    assert not api.runtime.snapshot.policy.tasks_by_id["q3/market"].revoked


def test_the_agent_may_give_up_its_own_grant(api: Api) -> None:
    """Last in the module: it revokes q3/market."""
    status, reply = api.call("POST", "/v1/tasks/q3/market/revoke")
    assert status == 200 and reply["revoked"] == "q3/market" and reply["revocations"]
    assert api.runtime.snapshot.policy.tasks_by_id["q3/market"].revoked
    assert api.published.read_text().strip() == reply["revocations"]
    assert ROOT_TASK["id"] not in api.runtime.carried.own_revoked
