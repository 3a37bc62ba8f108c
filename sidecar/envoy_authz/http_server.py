"""The ext_authz HTTP service: Envoy's HTTP checks on a raw asyncio protocol with ``httptools``.

Envoy's HTTP ext_authz client speaks HTTP/1.1 with keep-alive, one check at a time per connection
(it opens more connections for concurrent checks). Each connection is an :class:`asyncio.Protocol`
that feeds bytes to ``httptools`` (the llhttp parser) and answers each check as soon as it is read,
in the same callback: the decision is synchronous, so answers leave in request order, pipelined or
not. With ``decision_log.fsync`` an answer waits for its record's ``fsync``; reading pauses until it
is written, so order still holds. llhttp knows a fixed set of methods while a client may send any
token over HTTP/2, which Envoy copies into the check: a check that starts a read with a method
other than the common ones is parsed as a ``GET`` and judged with its own method (Envoy sends one
check at a time per connection, so each starts a read; one pipelined behind another would close
the connection - 503, fail closed).

Measured against Envoy 1.40 (``docs/performance.md``): about 1.5x the checks per second of the
grpc.aio service for the same decision work. Only Envoy connects (a ``0600`` Unix socket in the
proxy's private directory); bytes that are not HTTP close the connection (Envoy answers 503: fail
closed), a check over 96 KiB of headers or over the largest body cap is a recorded ``bad_request``
deny.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import httptools
import structlog

from sidecar.envoy_authz.http_check import MAX_HEADER_BYTES, HttpCheck, build_http_answer, parse_http_check
from sidecar.envoy_authz.service import AuthorizationService

__all__ = ["MAX_BODY_BYTES", "CheckProtocol", "start_http_service"]

_log = structlog.get_logger("agent_authz.authz_http")
MAX_BODY_BYTES = (1 << 20) + 1
"""The largest body a check may carry: ``envoy.rpc_body_cap`` (at most 1 MiB) plus the byte Envoy
buffers more."""


_PARSED_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"})
"""Methods llhttp parses itself; any other one is parsed as ``GET`` and kept as sent."""
_METHOD_SCAN = 40  # a method is at most 32 characters (sidecar.envoy_authz.context.METHOD)
_METHOD_BYTES = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")


class CheckProtocol(asyncio.Protocol):
    """One connection from Envoy's HTTP ext_authz client.

    Args:
        service: decides, records and counts each check.
    """

    __slots__ = (
        "_check",
        "_head",
        "_header_bytes",
        "_idle",
        "_method",
        "_parser",
        "_paused",
        "_pending",
        "_service",
        "_transport",
    )

    def __init__(self, service: AuthorizationService) -> None:
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._check = HttpCheck()
        self._header_bytes = 0
        self._pending: asyncio.Task[None] | None = None
        self._paused = False
        self._idle = True  # between checks: the next byte starts one
        self._head = b""
        self._method = b""

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        if self._idle:  # this data starts a check: its method may be one llhttp does not know
            data = (self._head + data).lstrip(b"\r\n")
            space = data.find(b" ", 0, _METHOD_SCAN)
            if space < 0 and len(data) < _METHOD_SCAN and _METHOD_BYTES.fullmatch(data):
                self._head = data  # the method is split across reads
                return
            self._head = b""
            self._idle = False
            method = data[:space] if space > 0 else b""
            if method not in _PARSED_METHODS:
                # llhttp accepts only the methods it knows; a client may send any token (over HTTP/2):
                # parse a GET in its place and keep the method as sent (parse_http_check checks it)
                self._method = method
                data = b"GET" + data[space:] if space > 0 else data
        while data:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # a check of a CONNECT or Upgrade request (its headers copied into the check): answered
                # already, it has no tunnel here - the next check starts after it, on a new parser
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                data = data[offset:]
                self._parser = httptools.HttpRequestParser(self)
            except httptools.HttpParserError as exc:
                _log.warning("authz_http_unreadable", error=str(exc)[:200])
                self._close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._check = HttpCheck()
        self._header_bytes = 0
        self._idle = False

    def on_url(self, url: bytes) -> None:
        check = self._check
        self._header_bytes += len(url)
        if self._header_bytes <= MAX_HEADER_BYTES:
            check.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        check = self._check
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            check.problem = "check larger than 96 KiB without its body"
            return
        try:
            key, text = name.decode("ascii").lower(), value.decode()
        except UnicodeDecodeError:
            check.problem = "a header of the check is not UTF-8"
            return
        headers = check.headers
        headers[key] = f"{headers[key]},{text}" if key in headers else text

    def on_body(self, body: bytes) -> None:
        check = self._check
        if len(check.body) + len(body) > MAX_BODY_BYTES:
            check.problem = "check body larger than the largest body cap"
            return
        check.body += body

    def on_message_complete(self) -> None:
        check = self._check
        check.method = self._method or self._parser.get_method()
        self._method = b""
        self._idle = True
        keep_alive = self._parser.should_keep_alive()
        answer, wait = self._service.answer(lambda: parse_http_check(check), build_http_answer)
        if wait is None and self._pending is None:
            self._write(answer, keep_alive)
            return
        later = self._answer_later(self._pending, wait, answer, keep_alive)
        self._pending = asyncio.get_running_loop().create_task(later)

    # -- answers ---------------------------------------------------------------------------------
    def _write(self, answer: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(answer)
        if not keep_alive:
            self._close()

    async def _answer_later(
        self,
        before: asyncio.Task[None] | None,
        wait: Callable[[], Awaitable[bytes]] | None,
        answer: bytes,
        keep_alive: bool,
    ) -> None:
        """Answer once the record is synced, after every earlier answer of this connection."""
        if self._transport is not None and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        try:
            if before is not None:
                with contextlib.suppress(Exception):
                    await before
            if wait is not None:
                answer = await wait()
            self._write(answer, keep_alive)
        finally:
            if self._pending is asyncio.current_task():
                self._pending = None
                if self._transport is not None and self._paused:
                    self._transport.resume_reading()
                self._paused = False


async def start_http_service(service: AuthorizationService, address: str) -> tuple[asyncio.Server, str]:
    """Listen for Envoy's HTTP checks on ``address`` (``unix:/path`` or ``host:port``).

    A ``unix:`` socket replaces a stale one at the path; the caller prepares its directory and
    restricts its mode.

    Returns:
        The server and the bound address (``host:port`` with the real port for port 0).

    Raises:
        OSError: the address is unavailable.
    """
    loop = asyncio.get_running_loop()

    def factory() -> CheckProtocol:
        return CheckProtocol(service)

    if address.startswith("unix:"):
        path = Path(address[5:])
        path.unlink(missing_ok=True)
        server = await loop.create_unix_server(factory, str(path), backlog=1024)
        return server, address
    host, _, port = address.rpartition(":")
    server = await loop.create_server(factory, host.strip("[]"), int(port), backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    return server, f"{host}:{bound}"
