"""A sample upstream that checks what agent-authz injected, and records what it received.

One aiohttp server answers for several host names (told apart by ``Host``), like the internal
market-data API and the paid sentiment API of the demo. For a *token* host it verifies the bearer
token against the sidecar's JWKS (signature, ``iss``, ``aud``, ``exp``) and answers 401 otherwise;
for an *API-key* host it checks the injected key. Every request is recorded, so the demo and the
tests can assert on exactly what reached the upstream.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

__all__ = ["ApiKeyCheck", "Received", "SampleUpstream", "TokenCheck"]


@dataclass(frozen=True)
class TokenCheck:
    """Verify ``Authorization: Bearer`` against ``jwks_url`` with this audience and issuer."""

    audience: str
    issuer: str


@dataclass(frozen=True)
class ApiKeyCheck:
    """Require ``header`` to equal ``value``."""

    header: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class Received:
    """One request as the upstream saw it.

    Attributes:
        host / method / raw_path: as received (``raw_path`` includes the query, undecoded).
        headers: all headers, lower-case names (duplicates joined by ``, ``).
        claims: verified token claims, when the host checks tokens and the token verified.
        error: why verification failed, or ``None``.
        scheme: ``https`` when it arrived over TLS, else ``http``.
    """

    host: str
    method: str
    raw_path: str
    headers: Mapping[str, str]
    claims: Mapping[str, Any] | None
    error: str | None
    scheme: str = "http"


class SampleUpstream:
    """Runs the sample APIs on ``127.0.0.1:0`` in a background thread.

    Args:
        checks: host name (without port) to the check it applies; other hosts get 200 unchecked.
        jwks_url: where to fetch the verification keys (may be set after start).
        ssl_context: serve HTTPS with this server context (its certificate names the hosts).
    """

    def __init__(
        self,
        checks: Mapping[str, TokenCheck | ApiKeyCheck],
        jwks_url: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.checks = dict(checks)
        self.jwks_url = jwks_url
        self.ssl_context = ssl_context
        self.received: list[Received] = []
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._jwks: jwt.PyJWKSet | None = None

    # -- verification -------------------------------------------------------------------------
    def _keys(self, refresh: bool = False) -> jwt.PyJWKSet:
        if self._jwks is None or refresh:
            if not self.jwks_url:
                raise RuntimeError("jwks_url is not set")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.jwks_url, timeout=5) as response:
                self._jwks = jwt.PyJWKSet.from_dict(json.loads(response.read()))
        return self._jwks

    def _verify(self, token: str, check: TokenCheck) -> dict[str, Any]:
        kid = str(jwt.get_unverified_header(token).get("kid"))
        keys = self._keys()
        if kid not in {k.key_id for k in keys.keys}:
            keys = self._keys(refresh=True)
        key = keys[kid]
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=["ES256", "EdDSA"],
            audience=check.audience,
            issuer=check.issuer,
            options={"require": ["exp", "iat", "jti", "sub", "aud", "iss"]},
        )
        if jwt.get_unverified_header(token).get("typ") != "at+jwt":
            raise jwt.InvalidTokenError("typ is not at+jwt")
        return claims

    async def _handle(self, request: web.Request) -> web.Response:
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") else request.host
        headers = {}
        for name in request.headers:
            headers[name.lower()] = ", ".join(request.headers.getall(name))
        check = self.checks.get(host)
        claims = None
        error = None
        if isinstance(check, TokenCheck):
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or "," in auth:
                error = "missing or repeated bearer token"
            else:
                try:
                    claims = await asyncio.get_running_loop().run_in_executor(None, self._verify, auth[7:], check)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
        elif isinstance(check, ApiKeyCheck) and headers.get(check.header) != check.value:
            error = f"missing or wrong {check.header}"
        with self._lock:
            self.received.append(
                Received(host, request.method, request.raw_path, headers, claims, error, request.scheme)
            )
        if error is not None:
            return web.json_response({"error": error}, status=401)
        body: dict[str, Any] = {"ok": True, "host": host, "path": request.path}
        if claims is not None:
            body["token"] = {k: claims.get(k) for k in ("sub", "act", "aud", "scope", "txn")}
        return web.json_response(body)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0, *, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving on ``host:port`` (``0``: a free port; the thread inherits the caller's
        network namespace); returns the bound port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context)
            await site.start()
            self.port = int(self._runner.addresses[0][1])

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(main())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="sample-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"sample upstream failed to start: {failure}")
        return self.port

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def requests(self) -> list[Received]:
        """A copy of what was received so far."""
        with self._lock:
            return list(self.received)
