"""The admin HTTP server (aiohttp): JWKS, health and readiness.

Routes:
    ``GET /.well-known/jwks.json`` - public keys of task-scoped tokens (current, next, retired).
    ``GET /healthz`` - the process is alive.
    ``GET /readyz`` - 200 when configuration and keys are loaded; 503 otherwise.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.admin.tasks_api import add_task_routes
from sidecar.runtime import Runtime

__all__ = ["make_admin_app"]

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


async def _jwks(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response(runtime.jwks(), headers={"Cache-Control": "max-age=60"})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    snapshot = runtime.snapshot
    body: dict[str, object] = {
        "status": "ready",
        "agent": snapshot.policy.agent,
        "config_digest": snapshot.digest[:16],
        "tasks": len(snapshot.policy.tasks_by_id),
        "kid": snapshot.keys.current.kid,
        "last_reload_error": runtime.last_error,
        "identity": None,
    }
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
        }
        if svid.not_after <= runtime.clock():
            body["status"] = "svid_expired"
            return web.json_response(body, status=503)
    return web.json_response(body)


def make_admin_app(runtime: Runtime) -> web.Application:
    """Build the admin application bound to ``runtime``."""
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/.well-known/jwks.json", _jwks)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_task_routes(app, runtime)
    return app
