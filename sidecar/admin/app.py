"""The admin HTTP server (aiohttp): JWKS, health, readiness, metrics and the decision viewer.

Routes:
    ``GET /.well-known/jwks.json`` - public keys of task-scoped tokens (current, next, retired).
    ``GET /healthz`` - the process is alive.
    ``GET /readyz`` - 200 when configuration and keys are loaded, the decision log sink works and
        the SVID (if any) is unexpired; 503 (with the reason in the body) otherwise. The body also
        shows the identity (SPIFFE ID, SVID serial and expiry) and the decision log head.
    ``GET /metrics`` - Prometheus text exposition (:mod:`sidecar.metrics`).
    ``/decisions…`` - the decision viewer (:mod:`sidecar.admin.viewer`).
    ``/v1/tasks…``, ``/v1/revocations`` - the local task API (:mod:`sidecar.admin.tasks_api`).
    ``/v1/control/actions``, ``/v1/approvals…`` - signed freeze/unfreeze/kill actions and approvals
        (:mod:`sidecar.admin.control_api`).
    ``GET /ca.pem`` - with ``intercept``: the per-pod CA certificate (PEM) the agent trusts; 404 otherwise.

The admin server listens on ``127.0.0.1`` by default; reach it from outside the pod with
``kubectl port-forward``.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.admin.control_api import add_control_routes
from sidecar.admin.tasks_api import add_task_routes
from sidecar.admin.viewer import add_viewer_routes
from sidecar.audit.log import DecisionLog
from sidecar.metrics import CONTENT_TYPE, Metrics
from sidecar.runtime.active import Runtime
from sidecar.runtime.control import ControlService
from sidecar.runtime.tasks import TaskService
from sidecar.tls_intercept.manager import InterceptManager

__all__ = ["make_admin_app", "readiness"]

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
DECISION_LOG: web.AppKey[DecisionLog] = web.AppKey("decision_log", DecisionLog)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
INTERCEPT: web.AppKey[InterceptManager | None] = web.AppKey("intercept")


async def _jwks(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response(runtime.jwks(), headers={"Cache-Control": "max-age=60"})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def readiness(
    runtime: Runtime, log: DecisionLog, intercept: InterceptManager | None = None
) -> tuple[bool, dict[str, object]]:
    """Whether the sidecar is ready, and the ``/readyz`` body.

    Ready: configuration and keys loaded (always, once running), the decision log sink works, the
    SVID (with an identity source) has not expired, and the pod CA (with ``intercept``) has not
    expired. With ``intercept`` the body also shows the CA, the intercepted hosts and their leaves.
    A refused identity update leaves the sidecar ready on its previous SVID; ``identity.last_error``
    (``"<sub-code>: <reason>"``) and ``identity.rejected_updates`` show it.
    """
    snapshot = runtime.snapshot
    body: dict[str, object] = {
        "status": "ready" if log.healthy else "not_ready",
        "agent": snapshot.policy.agent,
        "config_digest": snapshot.digest[:16],
        "tasks": len(snapshot.policy.tasks_by_id),
        "kid": snapshot.keys.current.kid,
        "last_reload_error": runtime.last_error,
        "dry_run": snapshot.loaded.settings.dry_run,
        "decision_log": {
            "healthy": log.healthy,
            "error": log.last_error,
            "path": None if log.path is None else str(log.path),
            "seq": log.head.seq,
            "hash": log.head.hash,
        },
        "identity": None,
    }
    ready = log.healthy
    identity = snapshot.identity
    if identity is not None:
        svid = identity.state.svid
        body["identity"] = {
            "source": identity.state.source,
            "spiffe_id": svid.spiffe_id,
            "serial": svid.serial,
            "not_after": int(svid.not_after),
            "trust_domains": sorted(identity.state.bundles.trust_domains),
            "last_error": runtime.last_identity_error,
            "rejected_updates": sum(runtime.identity_rejections.values()),
        }
        if svid.not_after <= runtime.clock():
            body["status"] = "svid_expired"
            ready = False
    if intercept is not None:
        status = intercept.status(runtime.clock())
        body["intercept"] = status
        if status["ca_expired"]:
            body["status"] = "intercept_ca_expired"
            ready = False
    return ready, body


async def _readyz(request: web.Request) -> web.Response:
    ready, body = readiness(request.app[RUNTIME], request.app[DECISION_LOG], request.app[INTERCEPT])
    return web.json_response(body, status=200 if ready else 503)


async def _ca_pem(request: web.Request) -> web.Response:
    intercept = request.app[INTERCEPT]
    if intercept is None or intercept.ca is None:
        return web.json_response({"error": "not_configured", "detail": "no 'intercept' section"}, status=404)
    return web.Response(body=intercept.ca.cert_pem, content_type="application/x-pem-file")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def make_admin_app(
    runtime: Runtime,
    decision_log: DecisionLog,
    metrics: Metrics,
    *,
    intercept: InterceptManager | None = None,
    tasks: TaskService | None = None,
    control: ControlService | None = None,
) -> web.Application:
    """Build the admin application bound to ``runtime``, ``decision_log``, ``metrics`` (and ``intercept``);
    the task API is served by ``tasks`` (a :class:`TaskService` of ``runtime`` by default), the control
    API and the viewer's approvals by ``control`` (a :class:`ControlService` of ``runtime`` by default)."""
    app = web.Application()
    app[RUNTIME] = runtime
    app[DECISION_LOG] = decision_log
    app[METRICS] = metrics
    app[INTERCEPT] = intercept
    app.router.add_get("/ca.pem", _ca_pem)
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    service = tasks if tasks is not None else TaskService(runtime)
    operator = control if control is not None else ControlService(runtime)
    add_viewer_routes(app, service, decision_log, operator)
    add_task_routes(app, service, decision_log)
    add_control_routes(app, operator)
    return app
