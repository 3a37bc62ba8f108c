"""Sample MCP and A2A servers built with the official SDKs (``mcp``, ``a2a-sdk``), for the
``mcp`` demo scenario, the tests and the benchmark.

* :func:`warehouse_app`: an MCP server (``mcp.server.MCPServer``, Streamable HTTP at ``/mcp``) of
  a data warehouse: tools ``query(table, sql)``, ``list_tables()``, ``drop_table(table)``, the
  resource template ``table://{name}`` and the prompt ``summarize(topic)``. Every executed tool call
  is appended to :data:`CALLS` so a test can tell what reached the server.
* ``python -m sidecar.demo.agent_servers mcp|a2a HOST:PORT NAME [--log FILE] [--ready FILE]``
  serves one of them in its own process (a test's upstream network namespace); executed tool
  calls are appended to ``--log`` as JSON lines.
* :func:`risk_agent_app`: an A2A agent (JSON-RPC binding, agent card at
  ``/.well-known/agent-card.json``) answering each message with ``risk score for: <text>``.

:class:`ServerThread` runs an ASGI app under uvicorn on ``127.0.0.1`` (port 0) in a thread.
Both SDKs are test extras (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

__all__ = ["CALLS", "ServerThread", "main", "risk_agent_app", "warehouse_app"]

CALLS: list[tuple[str, dict[str, Any]]] = []
"""``(tool, arguments)`` of every tool call the warehouse executed (this process)."""
_CALL_LOG: list[str] = []  # a file that also receives each call (standalone servers)


def _called(tool: str, arguments: dict[str, Any]) -> None:
    CALLS.append((tool, arguments))
    if _CALL_LOG:
        import json

        with open(_CALL_LOG[0], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


def warehouse_app(allowed_hosts: list[str]) -> Any:
    """The MCP warehouse as a Starlette app; ``allowed_hosts`` are the Host values it accepts
    (the SDK's DNS-rebinding protection)."""
    import logging

    from mcp.server import MCPServer
    from mcp.server.transport_security import TransportSecuritySettings

    logging.getLogger("mcp").setLevel(logging.WARNING)  # no "session manager started" lines in the demo

    mcp = MCPServer("warehouse")

    @mcp.tool()
    def query(table: str, sql: str = "select *") -> str:
        """Run a read-only query on one table."""
        _called("query", {"table": table, "sql": sql})
        return f"3 rows from {table}"

    @mcp.tool()
    def list_tables() -> list[str]:
        """List the tables."""
        _called("list_tables", {})
        return ["prices_q3", "sales_q3", "salaries"]

    @mcp.tool()
    def drop_table(table: str) -> str:
        """Drop a table."""
        _called("drop_table", {"table": table})
        return f"dropped {table}"

    @mcp.resource("table://{name}")
    def table_schema(name: str) -> str:
        """The schema of a table."""
        return f"schema of {name}: (id int, value float)"

    @mcp.prompt()
    def summarize(topic: str) -> str:
        """A summary prompt."""
        return f"Summarize {topic} for the quarterly risk report."

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*allowed_hosts, *(f"{h}:*" for h in allowed_hosts)],
        allowed_origins=[],
    )
    return mcp.streamable_http_app(transport_security=security)


def risk_agent_app(url: str) -> Any:
    """The A2A risk agent as a Starlette app; ``url`` is its JSON-RPC endpoint as clients name it."""
    from a2a.helpers.proto_helpers import get_message_text, new_text_message
    from a2a.server.agent_execution import AgentExecutor, RequestContext
    from a2a.server.events import EventQueue
    from a2a.server.request_handlers import DefaultRequestHandler
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.tasks import InMemoryTaskStore
    from a2a.types import a2a_pb2
    from a2a.utils.errors import UnsupportedOperationError
    from starlette.applications import Starlette

    class RiskExecutor(AgentExecutor):
        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            text = get_message_text(context.message) if context.message is not None else ""
            await event_queue.enqueue_event(new_text_message(f"risk score for: {text}"))

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            raise UnsupportedOperationError("the risk agent answers at once: nothing to cancel")

    card = a2a_pb2.AgentCard(
        name="risk-agent",
        description="Scores the risk of a portfolio",
        version="1.0.0",
        supported_interfaces=[a2a_pb2.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=a2a_pb2.AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[a2a_pb2.AgentSkill(id="risk", name="risk", description="risk score", tags=["risk"])],
    )
    handler = DefaultRequestHandler(agent_executor=RiskExecutor(), task_store=InMemoryTaskStore(), agent_card=card)
    routes = [*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")]
    return Starlette(routes=routes)


class ServerThread:
    """An ASGI app under uvicorn on ``127.0.0.1`` in a daemon thread.

    Args:
        app: the ASGI application.
    """

    def __init__(self, app: Any) -> None:
        self._app = app
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, timeout: float = 10.0) -> int:
        """Start and wait until it accepts connections; returns the port.

        Raises:
            TimeoutError: it did not start within ``timeout`` seconds.
        """
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                task = loop.create_task(self._server.serve(sockets=[sock]))
                while not self._server.started and not task.done():
                    loop.run_until_complete(asyncio.sleep(0.02))
                started.set()
                loop.run_until_complete(task)
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]  # sse-starlette's watcher
                for leftover in pending:
                    leftover.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                sock.close()
                started.set()

        self._thread = threading.Thread(target=run, name="asgi-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or not self._server.started:
            raise TimeoutError("the ASGI server did not start")
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


def main(argv: list[str] | None = None) -> None:
    """Serve the warehouse (``mcp``) or the risk agent (``a2a``) on ``HOST:PORT`` until killed."""
    import argparse
    from pathlib import Path

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m sidecar.demo.agent_servers")
    parser.add_argument("kind", choices=["mcp", "a2a"])
    parser.add_argument("address", help="HOST:PORT to listen on")
    parser.add_argument("name", help="the host name clients use")
    parser.add_argument("--log", help="append executed tool calls here (JSON lines)")
    parser.add_argument("--ready", help="create this file once listening")
    args = parser.parse_args(argv)
    if args.log:
        _CALL_LOG.append(args.log)
    app = warehouse_app([args.name]) if args.kind == "mcp" else risk_agent_app(f"http://{args.name}/")
    host, _, port = args.address.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if args.ready:
            Path(args.ready).touch()
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
