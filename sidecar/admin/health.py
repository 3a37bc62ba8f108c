"""The probe server (``listen.health``): what kubelet may see of the sidecar, and nothing more.

Routes (plain HTTP, minimal bodies - no SPIFFE ID, digest or log head, unlike the admin ``/readyz``):
    ``GET /healthz`` - 200 ``{"status": "ok"}``: the process is alive.
    ``GET /readyz`` - 200 ``{"status": "ready"}`` or 503 with the status word
        (:func:`sidecar.admin.app.readiness`).
    ``GET /envoy/ready`` - Envoy's admin ``/ready`` (on ``envoy.admin_socket``, or
        ``127.0.0.1:envoy.admin_port`` without one) relayed: 200 when Envoy's listeners are
        initialised, 503 otherwise or when Envoy's admin does not answer within 1 s. Envoy's admin
        stays out of the agent's reach; this relays one read-only path.
    ``GET /proxy/ready`` - both: 200 ``{"status": "ready"}`` only when ``/readyz`` and
        ``/envoy/ready`` would both answer 200, else 503 with the first status word that failed.
        The Envoy container's ``startupProbe``: the two native sidecars start side by side, and the
        pod's own containers start only once this passes.

The admin server binds to ``127.0.0.1`` (it serves the task API and the decision viewer), which a
kubelet probe cannot reach: it connects to the pod IP. The Helm chart's injector points the
native sidecars' startup, readiness and liveness probes here and excludes this port from inbound
interception.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sidecar.admin.app import DECISION_LOG, INTERCEPT, RUNTIME, readiness
from sidecar.audit.log import DecisionLog
from sidecar.runtime.active import Runtime
from sidecar.tls_intercept.manager import InterceptManager

__all__ = ["make_health_app"]

_ENVOY_TIMEOUT = aiohttp.ClientTimeout(total=1.0)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, body = readiness(request.app[RUNTIME], request.app[DECISION_LOG], request.app[INTERCEPT])
    return web.json_response({"status": body["status"]}, status=200 if ready else 503)


async def _envoy_ready(request: web.Request) -> web.Response:
    status, body = await _envoy_status(request)
    return web.json_response(body, status=status)


async def _proxy_ready(request: web.Request) -> web.Response:
    ready, body = readiness(request.app[RUNTIME], request.app[DECISION_LOG], request.app[INTERCEPT])
    if not ready:
        return web.json_response({"status": body["status"]}, status=503)
    status, envoy = await _envoy_status(request)
    return web.json_response({"status": envoy["status"]}, status=status)


async def _envoy_status(request: web.Request) -> tuple[int, dict[str, str]]:
    """Envoy's admin ``/ready``: ``(200|503, {"status": ..., ...})``."""
    loaded = request.app[RUNTIME].snapshot.loaded
    envoy = loaded.settings.envoy
    if envoy.admin_socket is not None:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(loaded.resolve(envoy.admin_socket)))
        url = "http://envoy-admin/ready"
    else:
        connector, url = aiohttp.TCPConnector(), f"http://127.0.0.1:{envoy.admin_port}/ready"
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=_ENVOY_TIMEOUT) as session,
            session.get(url) as reply,
        ):
            text = (await reply.text()).strip()[:64]
            status = 200 if reply.status == 200 else 503
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 503, {"status": "envoy_unreachable", "error": type(exc).__name__}
    return status, {"status": "ready" if status == 200 else "not_ready", "envoy": text}


def make_health_app(
    runtime: Runtime, decision_log: DecisionLog, *, intercept: InterceptManager | None = None
) -> web.Application:
    """Build the probe application bound to ``runtime`` and ``decision_log`` (and ``intercept``)."""
    app = web.Application()
    app[RUNTIME] = runtime
    app[DECISION_LOG] = decision_log
    app[INTERCEPT] = intercept
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/envoy/ready", _envoy_ready)
    app.router.add_get("/proxy/ready", _proxy_ready)
    return app
