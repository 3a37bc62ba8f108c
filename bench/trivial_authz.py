"""Trivial allow-all ext_authz servers in our stack: the Python ceilings, one per transport.

Run: ``python bench/trivial_authz.py [--transport grpc|aiohttp|raw] unix:/path/to.sock`` (or
``host:port``). Each answers every check with one prebuilt OK and does nothing else: no parsing,
no decision, no log. Benchmark configuration (c) measures Envoy with each:

* ``grpc`` - grpc.aio + uvloop, raw bytes (Envoy's gRPC ext_authz), a prebuilt ``CheckResponse``;
* ``aiohttp`` - an aiohttp web server + uvloop (Envoy's HTTP ext_authz service), an empty ``200``;
* ``raw`` - an :class:`asyncio.Protocol` + uvloop feeding ``httptools`` (llhttp), the same ``200``
  written from the parser's callback - the server shape of ``sidecar.envoy_authz.http_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

import uvloop

OK_HTTP = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


async def grpc_server(address: str) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2
    from google.rpc import code_pb2, status_pb2

    ok = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()

    async def check(_: bytes, __: Any) -> bytes:
        return ok

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.auth.v3.Authorization", {"Check": grpc.unary_unary_rpc_method_handler(check)}
            ),
        )
    )
    server.add_insecure_port(address)
    await server.start()
    await _until_signalled()
    await server.stop(0.5)


async def aiohttp_server(address: str) -> None:
    from aiohttp import web

    async def check(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", check)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    if address.startswith("unix:"):
        site: web.BaseSite = web.UnixSite(runner, address[5:])
    else:
        host, _, port = address.rpartition(":")
        site = web.TCPSite(runner, host, int(port))
    await site.start()
    await _until_signalled()
    await runner.cleanup()


class _Raw(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(OK_HTTP)


async def raw_server(address: str) -> None:
    loop = asyncio.get_running_loop()
    if address.startswith("unix:"):
        if os.path.exists(address[5:]):
            os.unlink(address[5:])
        server = await loop.create_unix_server(_Raw, address[5:], backlog=1024)
    else:
        host, _, port = address.rpartition(":")
        server = await loop.create_server(_Raw, host, int(port), backlog=1024)
    await _until_signalled()
    server.close()


SERVERS = {"grpc": grpc_server, "aiohttp": aiohttp_server, "raw": raw_server}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transport", choices=sorted(SERVERS), default="grpc")
    parser.add_argument("address")
    args = parser.parse_args()
    uvloop.run(SERVERS[args.transport](args.address))
