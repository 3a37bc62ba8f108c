"""The local task API on the admin port: accept grants, delegate, revoke, list.

Routes (JSON unless noted; errors are ``{"error": <code>, "detail": <text>}``):

* ``GET  /v1/tasks`` - the local agent's tasks (``agent`` is this sidecar's SPIFFE ID) with their
  budgets and chains, and the sub-grants delegated from each (``delegated``; ``budget.reserved`` is
  the part of ``budget.used`` given to them); other agents' tasks in the configuration are not shown.
* ``POST /v1/tasks`` - accept a grant (body: the compact JWS, or ``{"grant": "<jws>"}``); 201 ``{"id"}``.
* ``POST /v1/tasks/{id}/delegate`` - body :class:`~sidecar.grants.issue.DelegationRequest`; 201
  ``{"id", "grant", "expires_at"}``; 400 ``grant_widening`` names the widening field.
* ``POST /v1/tasks/{id}/revoke`` - 200 ``{"revoked", "revocations"}`` (the signed list published).
* ``GET  /v1/revocations`` - this sidecar's signed revocation list (``application/jwt``), 404 if none.

Every caller of these routes is taken to be the local agent - possibly hijacked - so it gets what
the agent's own signature could do (:class:`~sidecar.runtime.tasks.TaskService`): a revoke or
delegate of a task it has no authority over is answered 403 ``not_authorized`` (with the
``decision_id`` of the decision record written for it, direction ``local``), never 200 with no
effect. A body that is not what the route takes (not UTF-8, not JSON, nested too deeply, the wrong
shape) is answered 400 ``bad_request``, never 500.

Only loopback (or unix-socket) clients may use these routes: the admin server binds to localhost by
default, and this check keeps the task API local even when the admin port is exposed for metrics.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from sidecar.audit.log import DecisionLog, decision_record
from sidecar.config.loader import format_loc
from sidecar.decision import Decision, Direction, Reason
from sidecar.errors import DecisionLogError, StateError
from sidecar.grants.issue import DelegationRequest
from sidecar.grants.model import GrantCode, GrantError
from sidecar.runtime.tasks import NotAuthorizedError, TaskService

__all__ = ["add_task_routes"]

_log = structlog.get_logger("agent_authz.tasks_api")
_STATUS = {GrantCode.UNKNOWN_TASK: 404, GrantCode.DUPLICATE: 409, GrantCode.NOT_DELEGABLE: 409}


def _error(code: str, detail: str, status: int = 400) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


@web.middleware
async def _local_only(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        remote = request.remote
        if remote:
            try:
                loopback = ipaddress.ip_address(remote).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                return _error("forbidden", "the task API is only for the local agent", 403)
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException:
        raise
    except StateError as exc:  # the durable state could not be written: say so, and what took effect
        return _error("state_unavailable", exc.reason, 503)
    except Exception:  # an answer in the API's own shape, never a bare 500 page
        _log.exception("task_api_failed", path=request.path)
        return _error("internal_error", "the request could not be handled", 500)
    return response


TASKS: web.AppKey[TaskService] = web.AppKey("tasks", TaskService)
RECORDS: web.AppKey[DecisionLog | None] = web.AppKey("task_api_records")
_BAD_BODY = "the body must be UTF-8 JSON"


def _tasks(request: web.Request) -> TaskService:
    return request.app[TASKS]


def _grant_error(exc: GrantError) -> web.Response:
    return _error(exc.detail, str(exc), _STATUS.get(exc.detail, 400))


async def _not_authorized(request: web.Request, exc: NotAuthorizedError, started: int) -> web.Response:
    """403 ``not_authorized``, and a decision record of the refusal (a failed write is logged, the
    answer stays a refusal)."""
    runtime = _tasks(request).runtime
    decision = Decision(
        allow=False,
        reason=Reason.NOT_AUTHORIZED,
        http_status=403,
        decision_id=secrets.token_hex(16),
        detail=str(exc),
        direction=Direction.LOCAL,
        task_id=exc.task_id,
        agent=runtime.snapshot.policy.agent,
        method=request.method,
        path=request.path,
    )
    _log.warning("task_api_not_authorized", action=exc.action, task_id=exc.task_id, decision_id=decision.decision_id)
    log = request.app[RECORDS]
    if log is not None:
        latency_us = (time.perf_counter_ns() - started) // 1000
        try:
            log.append(decision_record(decision, request_id="", latency_us=latency_us, now=runtime.clock()))
            if log.fsync:
                await log.sync()
        except DecisionLogError as err:
            _log.error("decision_log_write_failed", error=str(err), sink=err.sink, decision_id=decision.decision_id)
    return web.json_response(
        {"error": Reason.NOT_AUTHORIZED.value, "detail": str(exc), "decision_id": decision.decision_id}, status=403
    )


async def _json_body(request: web.Request) -> Any:
    """The request body as JSON.

    Raises:
        ValueError: not UTF-8, not JSON, or nested deeper than the parser goes.
    """
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def _list(request: web.Request) -> web.Response:
    service = _tasks(request)
    runtime = service.runtime
    snapshot = runtime.snapshot
    now = runtime.clock()
    revoked_here = service.revoked_here()
    children: dict[str, list[dict[str, Any]]] = {}
    for issued in service.delegations():
        child = issued.spec
        children.setdefault(issued.parent, []).append(
            {
                "id": child.id,
                "agent": child.agent,
                "max_calls": child.max_calls,
                "expires_at": int(child.expires_at.timestamp()) if child.expires_at is not None else None,
                "revoked_here": child.id in revoked_here,
            }
        )
    tasks = []
    for task in service.visible():
        delegated = children.get(task.id, [])
        state = (
            "revoked"
            if task.revoked
            else "expired"
            if now >= task.expires_at
            else "pending"
            if now < task.not_before
            else "active"
        )
        tasks.append(
            {
                "id": task.id,
                "agent": task.agent,
                "on_behalf_of": task.on_behalf_of,
                "purpose": task.purpose,
                "state": state,
                "expires_at": int(task.expires_at),
                "txn": task.txn,
                "act": list(task.act_chain),
                "source": "grant" if task.grant is not None else "config",
                "ancestors": list(task.grant.ancestors) if task.grant is not None else [],
                "delegated": delegated,
                "budget": {
                    "max_calls": task.max_calls,
                    "used": runtime.budgets.used((task.id, "")),
                    "reserved": sum(d["max_calls"] or 0 for d in delegated) if task.max_calls is not None else 0,
                    "rules": {
                        rule.name: {
                            "max_calls": rule.max_calls,
                            "used": runtime.budgets.used((task.id, rule.budget_key)),
                        }
                        for rule in task.rules
                    },
                },
            }
        )
    return web.json_response({"agent": snapshot.policy.agent, "tasks": tasks})


async def _accept(request: web.Request) -> web.Response:
    shape = 'expected a compact JWS or {"grant": "<jws>"}'
    try:
        token = (await request.read()).decode("utf-8").strip()
    except UnicodeDecodeError:
        return _error("bad_request", f"the body must be UTF-8: {shape}")
    if token.startswith("{"):
        try:
            body = json.loads(token)
        except (ValueError, RecursionError):
            return _error("bad_request", shape)
        if not isinstance(body, dict) or not isinstance(body.get("grant"), str):
            return _error("bad_request", shape)
        token = body["grant"]
    try:
        grant = _tasks(request).accept(token)
    except GrantError as exc:
        return _grant_error(exc)
    return web.json_response({"id": grant.id, "expires_at": int(grant.expires_at)}, status=201)


async def _delegate(request: web.Request) -> web.Response:
    started = time.perf_counter_ns()
    try:
        body = await _json_body(request)
    except ValueError:
        return _error("bad_request", _BAD_BODY)
    try:
        delegation = DelegationRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return _error("bad_request", f"{format_loc(first['loc'])}: {first['msg']}")
    try:
        token, child = _tasks(request).delegate(request.match_info["task_id"], delegation)
    except GrantError as exc:
        return _grant_error(exc)
    except NotAuthorizedError as exc:
        return await _not_authorized(request, exc, started)
    assert child.expires_at is not None
    return web.json_response(
        {"id": child.id, "subject": child.agent, "grant": token, "expires_at": int(child.expires_at.timestamp())},
        status=201,
    )


async def _revoke(request: web.Request) -> web.Response:
    started = time.perf_counter_ns()
    try:
        token = _tasks(request).revoke(request.match_info["task_id"])
    except GrantError as exc:
        return _grant_error(exc)
    except NotAuthorizedError as exc:
        return await _not_authorized(request, exc, started)
    return web.json_response({"revoked": request.match_info["task_id"], "revocations": token})


async def _revocations(request: web.Request) -> web.Response:
    token = _tasks(request).revocation_list()
    if token is None:
        return _error("not_found", "this sidecar has revoked nothing", 404)
    return web.Response(text=token, content_type="application/jwt")


def add_task_routes(app: web.Application, tasks: TaskService, decision_log: DecisionLog | None = None) -> None:
    """Register the task API on ``app``, served by ``tasks``; refusals are recorded in ``decision_log``
    (when given)."""
    app[TASKS] = tasks
    app[RECORDS] = decision_log
    app.middlewares.append(_local_only)
    app.router.add_get("/v1/tasks", _list)
    app.router.add_post("/v1/tasks", _accept)
    app.router.add_post("/v1/tasks/{task_id:.+}/delegate", _delegate)
    app.router.add_post("/v1/tasks/{task_id:.+}/revoke", _revoke)
    app.router.add_get("/v1/revocations", _revocations)
