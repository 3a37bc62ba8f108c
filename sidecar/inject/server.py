"""``agent-authz webhook``: the mutating admission webhook as an aiohttp HTTPS server.

Routes:
    ``POST /inject`` - an ``admission.k8s.io/v1`` AdmissionReview of a Pod or a ``batch/v1`` Job
        (:func:`sidecar.inject.review.decide`); HTTP 400 with ``{"error": …}`` when the body is not
        an AdmissionReview that can be answered (not JSON, wrong kind or apiVersion, no
        ``request.uid``, not ``application/json``, over 4 MiB).
    ``GET /healthz`` - the process is alive.
    ``GET /readyz`` - serving (the settings and the sidecar configuration loaded at start).
    ``GET /metrics`` - Prometheus text: ``agent_authz_webhook_admissions_total`` by ``outcome``
        (:class:`~sidecar.metrics.WebhookMetrics`).

TLS 1.2 or later with the certificate and key from files (a Secret the chart generates, or one
cert-manager or the operator supplies); a rotated certificate is loaded without restart (the
directory is watched, as for the sidecar's config). Each answer is logged as one ``admission``
event (uid, namespace, pod, operation, kind, user - the requester's ``userInfo.username`` -,
outcome, message): a refused task declaration is recorded there with who sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import structlog
from aiohttp import web

from sidecar.config.watch import watch_and_reload
from sidecar.inject.podspec import AdmissionOutcome
from sidecar.inject.review import MAX_REVIEW_BYTES, BadReview, decide
from sidecar.inject.settings import InjectorConfig
from sidecar.metrics import CONTENT_TYPE, WebhookMetrics

__all__ = ["make_webhook_app", "serve_webhook", "tls_context"]

_log = structlog.get_logger("agent_authz.webhook")
CONFIG: web.AppKey[InjectorConfig] = web.AppKey("config", InjectorConfig)
METRICS: web.AppKey[WebhookMetrics] = web.AppKey("metrics", WebhookMetrics)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS >= 1.2) with ``cert`` (PEM chain, leaf first) and ``key``.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the certificate or key is invalid, or they do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _read_limited(request: web.Request) -> bytes | None:
    """The body, or ``None`` when it is larger than :data:`MAX_REVIEW_BYTES` (never read past that)."""
    if request.content_length is not None and request.content_length > MAX_REVIEW_BYTES:
        return None
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_REVIEW_BYTES:
            return None
    return bytes(body)


async def _inject(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if request.content_type != "application/json":
        metrics.observe(AdmissionOutcome.UNANSWERABLE)
        return _bad(f"expected Content-Type application/json, got {request.content_type!r}")
    body = await _read_limited(request)
    if body is None:
        metrics.observe(AdmissionOutcome.UNANSWERABLE)
        return _bad(f"request body larger than {MAX_REVIEW_BYTES} bytes")
    try:
        outcome = decide(body, request.app[CONFIG], now=time.time())
    except BadReview as exc:
        metrics.observe(AdmissionOutcome.UNANSWERABLE)
        _log.warning("admission_bad_request", error=str(exc), peer=request.remote)
        return _bad(str(exc))
    metrics.observe(outcome.outcome)
    review_request = json.loads(body)["request"]
    obj = review_request.get("object")
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict):
        metadata = {}
    _log.info(
        "admission",
        uid=review_request["uid"],
        namespace=review_request.get("namespace"),
        pod=metadata.get("name") or metadata.get("generateName"),
        operation=review_request.get("operation"),
        kind=(review_request.get("kind") or {}).get("kind") if isinstance(review_request.get("kind"), dict) else None,
        user=(review_request.get("userInfo") or {}).get("username")
        if isinstance(review_request.get("userInfo"), dict)
        else None,
        outcome=outcome.outcome,
        allowed=outcome.allowed,
        message=outcome.message or None,
    )
    return web.json_response(outcome.review)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def make_webhook_app(config: InjectorConfig) -> web.Application:
    """The webhook's aiohttp application (routes above)."""
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = WebhookMetrics(AdmissionOutcome)
    app.router.add_post("/inject", _inject)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


async def serve_webhook(
    config: InjectorConfig,
    *,
    listen: str,
    cert: Path,
    key: Path,
    ready_file: Path | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``).

    Args:
        config: the injector settings and sidecar configuration.
        listen: ``host:port`` (port 0: any free port; the bound one goes to ``ready_file``).
        cert / key: PEM files of the serving certificate; watched and reloaded on change.
        ready_file: once listening, ``{"listen": "host:port", "pid": n}`` is written here atomically.
        stop: ends the server (tests).

    Raises:
        OSError / ssl.SSLError: the address is unavailable, or the certificate cannot be loaded.
    """
    context = tls_context(cert, key)
    runner = web.AppRunner(make_webhook_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    site = web.SockSite(runner, sock, ssl_context=context)
    await site.start()
    bound = f"{host}:{sock.getsockname()[1]}"

    def reload_certificate() -> bool:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:  # half-written during rotation: keep the old one
            _log.error("webhook_certificate_reload_failed", error=str(exc))
            return False
        _log.info("webhook_certificate_reloaded", cert=str(cert))
        return True

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(
        watch_and_reload(lambda: frozenset({cert, key}), reload_certificate, stop), name="certificate-watch"
    )
    settings = config.settings
    _log.info("webhook_serving", listen=bound, image=settings.image, namespaces=settings.namespaces or "any")
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"listen": bound, "pid": os.getpid()}))
        tmp.replace(ready_file)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        _log.info("webhook_stopped")
