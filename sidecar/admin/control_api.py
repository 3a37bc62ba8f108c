"""The control API on the admin port: signed freeze/unfreeze/kill actions and approvals.

Routes (JSON; errors are ``{"error": <code>, "detail": <text>}``, codes from
:class:`~sidecar.control.documents.ControlCode`):

* ``GET  /v1/control/actions`` - every target an action named and its state (``frozen``,
  ``killed``, ``active``), and the tasks held here that the ladder blocks now.
* ``POST /v1/control/actions`` - body: signed actions, one compact JWS per line (``agent-authz task
  freeze|unfreeze|kill --admin URL``); 200 ``{"applied": [ids], "known": n}``.
* ``GET  /v1/approvals`` - the approvals known here (waiting, granted, used), with the calls they bind.
* ``POST /v1/approvals/{id}`` - body: a signed approval of ``id`` (``agent-authz approve ID``); 200
  with the approval; 404 ``control_unknown_approval``, 409 ``control_approval_closed``.

These routes are reachable wherever the task API is (loopback: the agent can reach them). That gives
it nothing: each body must be signed by a root issuer key or a trusted SVID the agent does not hold
(:mod:`sidecar.runtime.control`); a refusal is 403 (400 when malformed) and a ``not_authorized``
control record.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sidecar.control.approvals import Approval
from sidecar.control.documents import ControlCode, ControlError
from sidecar.runtime.control import ControlService

__all__ = ["CONTROL", "add_control_routes", "control_error"]

CONTROL: web.AppKey[ControlService] = web.AppKey("control", ControlService)
_STATUS = {
    ControlCode.MALFORMED: 400,
    ControlCode.UNKNOWN_APPROVAL: 404,
    ControlCode.APPROVAL_CLOSED: 409,
}
_MAX_BODY = 4 * 1024 * 1024


def control_error(exc: ControlError) -> web.Response:
    """The answer to a refused document: 400 malformed, 404 unknown, 409 closed, else 403."""
    return web.json_response({"error": exc.detail.value, "detail": str(exc)}, status=_STATUS.get(exc.detail, 403))


async def _text(request: web.Request) -> str | None:
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _approval_json(approval: Approval) -> dict[str, Any]:
    return approval.listing()


async def _get_actions(request: web.Request) -> web.Response:
    service = request.app[CONTROL]
    targets = [{"target": entry.target, "state": entry.state, **entry.action.record()} for entry in service.ladder()]
    blocked = [
        {"task_id": task_id, "reason": reason.value, "detail": detail}
        for task_id, (reason, detail) in sorted(service.runtime.blocks.items())
    ]
    return web.json_response({"targets": targets, "blocked": blocked})


async def _post_actions(request: web.Request) -> web.Response:
    service = request.app[CONTROL]
    text = await _text(request)
    if text is None:
        return control_error(ControlError(ControlCode.MALFORMED, "the body must be ASCII compact JWS lines"))
    try:
        new = service.act(text)
    except ControlError as exc:
        return control_error(exc)
    lines = len([line for line in text.splitlines() if line.strip()])
    return web.json_response({"applied": [a.action_id for a in new], "known": lines - len(new)})


async def _get_approvals(request: web.Request) -> web.Response:
    service = request.app[CONTROL]
    return web.json_response({"approvals": [_approval_json(a) for a in service.approvals()]})


async def _post_approval(request: web.Request) -> web.Response:
    service = request.app[CONTROL]
    text = await _text(request)
    if text is None or not text.strip():
        return control_error(ControlError(ControlCode.MALFORMED, "the body must be a signed approval (compact JWS)"))
    try:
        approval = service.approve(request.match_info["approval_id"], text.strip())
    except ControlError as exc:
        return control_error(exc)
    return web.json_response(_approval_json(approval))


def add_control_routes(app: web.Application, control: ControlService) -> None:
    """Register the control API on ``app``, served by ``control``."""
    app[CONTROL] = control
    app.router.add_get("/v1/control/actions", _get_actions)
    app.router.add_post("/v1/control/actions", _post_actions)
    app.router.add_get("/v1/approvals", _get_approvals)
    app.router.add_post("/v1/approvals/{approval_id}", _post_approval)
