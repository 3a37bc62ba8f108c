"""The local task API on the admin port: accept grants, delegate, revoke, list.

Routes (JSON unless noted; errors are ``{"error": <code>, "detail": <text>}``):

* ``GET  /v1/tasks`` - the active tasks with their budgets and chains, and the sub-grants delegated
  from each (``delegated``; ``budget.reserved`` is the part of ``budget.used`` given to them).
* ``POST /v1/tasks`` - accept a grant (body: the compact JWS, or ``{"grant": "<jws>"}``); 201 ``{"id"}``.
* ``POST /v1/tasks/{id}/delegate`` - body :class:`~sidecar.grants.issue.DelegationRequest`; 201
  ``{"id", "grant", "expires_at"}``; 400 ``grant_widening`` names the widening field.
* ``POST /v1/tasks/{id}/revoke`` - 200 ``{"revoked", "revocations"}`` (the signed list published).
* ``GET  /v1/revocations`` - this sidecar's signed revocation list (``application/jwt``), 404 if none.

Only loopback (or unix-socket) clients may use these routes: the admin server binds to localhost by
default, and this check keeps the task API local even when the admin port is exposed for metrics.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from sidecar.config.loader import format_loc
from sidecar.errors import StateError
from sidecar.grants.issue import DelegationRequest
from sidecar.grants.model import GrantCode, GrantError
from sidecar.runtime.tasks import TaskService

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


def _tasks(request: web.Request) -> TaskService:
    return request.app[TASKS]


def _grant_error(exc: GrantError) -> web.Response:
    return _error(exc.detail, str(exc), _STATUS.get(exc.detail, 400))


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
    for task in snapshot.policy.tasks_by_id.values():
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
    text = await request.text()
    token = text.strip()
    if token.startswith("{"):
        try:
            body = json.loads(token)
            token = str(body["grant"])
        except (ValueError, KeyError, TypeError):
            return _error("bad_request", 'expected a compact JWS or {"grant": "<jws>"}')
    try:
        grant = _tasks(request).accept(token)
    except GrantError as exc:
        return _grant_error(exc)
    return web.json_response({"id": grant.id, "expires_at": int(grant.expires_at)}, status=201)


async def _delegate(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        delegation = DelegationRequest.model_validate(body)
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors(include_url=False)[0]
            return _error("bad_request", f"{format_loc(first['loc'])}: {first['msg']}")
        return _error("bad_request", "the body must be JSON")
    try:
        token, child = _tasks(request).delegate(request.match_info["task_id"], delegation)
    except GrantError as exc:
        return _grant_error(exc)
    assert child.expires_at is not None
    return web.json_response(
        {"id": child.id, "subject": child.agent, "grant": token, "expires_at": int(child.expires_at.timestamp())},
        status=201,
    )


async def _revoke(request: web.Request) -> web.Response:
    try:
        token = _tasks(request).revoke(request.match_info["task_id"])
    except GrantError as exc:
        return _grant_error(exc)
    return web.json_response({"revoked": request.match_info["task_id"], "revocations": token})


async def _revocations(request: web.Request) -> web.Response:
    token = _tasks(request).revocation_list()
    if token is None:
        return _error("not_found", "this sidecar has revoked nothing", 404)
    return web.Response(text=token, content_type="application/jwt")


def add_task_routes(app: web.Application, tasks: TaskService) -> None:
    """Register the task API on ``app``, served by ``tasks``."""
    app[TASKS] = tasks
    app.middlewares.append(_local_only)
    app.router.add_get("/v1/tasks", _list)
    app.router.add_post("/v1/tasks", _accept)
    app.router.add_post("/v1/tasks/{task_id:.+}/delegate", _delegate)
    app.router.add_post("/v1/tasks/{task_id:.+}/revoke", _revoke)
    app.router.add_get("/v1/revocations", _revocations)
