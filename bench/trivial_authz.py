"""A trivial allow-all ext_authz server in our stack (grpc.aio + uvloop, raw bytes): the Python ceiling.

Run: ``python bench/trivial_authz.py unix:/path/to.sock`` (or ``host:port``). It answers every
``Check`` with one prebuilt OK ``CheckResponse`` and does nothing else: no parsing, no decision, no
log. Benchmark configuration (c) measures Envoy with this server.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2, status_pb2

OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()


async def check(_: bytes, __: Any) -> bytes:
    return OK


async def main(address: str) -> None:
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
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
