"""What MCP rules cost per call: decided by headers, by body inspection, and ``tools/list`` filtering.

Run: ``.venv/bin/python bench/mcp.py [--calls N] [--tools N]``

One sidecar and one Envoy (the rendered bootstrap, as in production) in front of a minimal
JSON-RPC upstream (aiohttp, a fixed answer per method, so the upstream adds the same small time to
every variant). The same request is sent, interleaved in rounds, to three hosts:

* ``plain.internal`` - a plain HTTP rule (``POST /mcp``): ext_authz on headers only, no body, no
  ext_proc - "the same call without them";
* ``headers.internal`` - ``protocol: mcp`` with ``envoy.mcp_header_decisions``: a 2026-07-28 call
  carrying ``Mcp-Method``/``Mcp-Name`` is judged on the headers (no body buffered);
* ``body.internal`` - ``protocol: mcp``: Envoy buffers the body and the sidecar parses it strictly
  (and, for ``tools/list``, the ext_proc filter rewrites the answer).

Measured per variant: p50 / p90 / p99 latency of one request on a kept-alive connection, in
microseconds, and the added p50 against ``plain``. ``tools/call`` goes to all three;
``tools/list`` (``--tools`` tools in the answer, half of them allowed) to ``plain`` and ``body``;
a ``tools/call`` on ``body`` also shows what ext_proc costs on a response it does not filter
(one round trip on the response headers).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from aiohttp import web  # noqa: E402

from sidecar.harness import AuthzStack  # noqa: E402
from sidecar.tokens.keys import generate_private_key_pem  # noqa: E402

AGENT = "spiffe://bench.example/ns/agents/sa/worker"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


class Upstream:
    """A JSON-RPC server answering ``tools/call`` and ``tools/list`` (``tools`` tools) at once."""

    def __init__(self, tools: int) -> None:
        listing = [
            {"name": f"tool_{i}", "description": "x" * 40, "inputSchema": {"type": "object"}} for i in range(tools)
        ]
        self.answers = {
            "tools/list": {"tools": listing},
            "tools/call": {"content": [{"type": "text", "text": "3 rows"}], "isError": False},
        }
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        message = json.loads(await request.read())
        result = self.answers.get(message.get("method"), {})
        return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": result})

    def start(self) -> int:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/mcp", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            await asyncio.Event().wait()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        return self.port


def _config(state: Path, upstream: int, tools: int) -> Path:
    (state / "keys").mkdir(parents=True, exist_ok=True)
    (state / "keys" / "signing.pem").write_bytes(generate_private_key_pem())
    allowed = [f"tool_{i}" for i in range(0, tools, 2)] or ["tool_0"]
    mcp = {"protocol": "mcp", "paths": ["/mcp"], "token": False, "tools": allowed}
    config = {
        "agent": AGENT,
        "issuer": {"url": "https://issuer.bench", "signing_key": "keys/signing.pem"},
        "listen": {"authz": f"unix:{state / 'authz.sock'}", "admin": "127.0.0.1:0"},
        "envoy": {
            "egress_port": 0,
            "admin_socket": str(state / "envoy-admin.sock"),
            "destinations": {
                h: f"127.0.0.1:{upstream}" for h in ("plain.internal", "headers.internal", "body.internal")
            },
            "mcp_header_decisions": ["headers.internal"],
        },
        "decision_log": {"path": "decisions.log", "stdout": False},
        "tasks": [
            {
                "id": "bench",
                "agent": AGENT,
                "purpose": "bench",
                "ttl": "1h",
                "egress": [
                    {"host": "plain.internal", "methods": ["POST"], "paths": ["/mcp"], "token": False},
                    {**mcp, "host": "headers.internal"},
                    {**mcp, "host": "body.internal"},
                ],
            }
        ],
    }
    path = state / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _request(method: str, rid: int) -> tuple[bytes, dict[str, str]]:
    params: dict[str, Any] = {"_meta": META}
    headers = {"content-type": "application/json", "mcp-method": method, "mcp-protocol-version": "2026-07-28"}
    if method == "tools/call":
        params.update(name="tool_0", arguments={"table": "prices_q3", "limit": 100})
        headers["mcp-name"] = "tool_0"
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode(), headers


def _measure(port: int, host: str, method: str, count: int, check: str | None) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    try:
        for rid in range(count):
            body, headers = _request(method, rid)
            started = time.perf_counter()
            conn.request("POST", f"http://{host}/mcp", body, headers)
            response = conn.getresponse()
            data = response.read()
            times.append((time.perf_counter() - started) * 1e6)
            if response.status != 200 or (check is not None and check not in data.decode()):
                raise RuntimeError(f"{host} {method}: {response.status} {data[:200]!r}")
    finally:
        conn.close()
    return times


def _row(name: str, times: list[float], base: float | None) -> str:
    q = statistics.quantiles(times, n=100)
    p50 = statistics.median(times)
    added = f"{p50 - base:+8.0f}" if base is not None else "       -"
    return f"  {name:42} {p50:8.0f} {q[89]:8.0f} {q[98]:8.0f} {added}"


def _in_process(upstream: Upstream, tools: int) -> dict[str, float]:
    """The sidecar's own work, without Envoy or gRPC: the strict parse and the filter."""
    import timeit

    from sidecar.agentproto.jsonrpc import parse_message
    from sidecar.agentproto.listfilter import filter_tools_list
    from sidecar.agentproto.names import NameSet

    body, _ = _request("tools/call", 1)
    answer = json.dumps({"jsonrpc": "2.0", "id": 1, "result": upstream.answers["tools/list"]}).encode()
    sse = b"event: message\ndata: " + answer + b"\n\n"
    allowed = NameSet.compile(f"tool_{i}" for i in range(0, tools, 2)).matches
    cases = {
        f"parse a tools/call body ({len(body)} B)": lambda: parse_message(body, cap=65536),
        f"filter tools/list JSON ({len(answer)} B)": lambda: filter_tools_list(answer, "application/json", allowed),
        "filter tools/list SSE (same)": lambda: filter_tools_list(sse, "text/event-stream", allowed),
    }
    return {what: min(timeit.repeat(call, number=200, repeat=5)) / 200 * 1e6 for what, call in cases.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="requests per variant (default 2000)")
    parser.add_argument("--tools", type=int, default=50, help="tools in the tools/list answer (default 50)")
    args = parser.parse_args(argv)
    upstream = Upstream(args.tools)
    state = Path(tempfile.mkdtemp(prefix="aa-bench-mcp-", dir="/tmp"))
    stack = AuthzStack(_config(state, upstream.start(), args.tools), state)
    stack.start()
    try:
        variants = [
            ("tools/call  plain rule (no body)", "plain.internal", "tools/call", None),
            ("tools/call  MCP rule, by headers", "headers.internal", "tools/call", None),
            ("tools/call  MCP rule, by body", "body.internal", "tools/call", None),
            ("tools/list  plain rule (unfiltered)", "plain.internal", "tools/list", f"tool_{args.tools - 1}"),
            ("tools/list  MCP rule, filtered (ext_proc)", "body.internal", "tools/list", "tool_0"),
        ]
        for _, host, method, check in variants:  # warm up; the filtered list must not show tool_1
            _measure(stack.egress_port, host, method, 50, check)
        listed = _measure(stack.egress_port, "body.internal", "tools/list", 1, None)
        assert listed
        times: dict[str, list[float]] = {name: [] for name, *_ in variants}
        rounds = 10
        for _ in range(rounds):
            for name, host, method, check in variants:
                times[name] += _measure(stack.egress_port, host, method, args.calls // rounds, check)
        size = len(json.dumps(upstream.answers["tools/list"]))
        print(f"bench/mcp.py: {args.calls} requests per variant, sequential, one kept-alive connection;")
        print(f"  tools/list answer: {args.tools} tools, {size} bytes, half allowed; latency in µs\n")
        print(f"  {'variant':42} {'p50':>8} {'p90':>8} {'p99':>8} {'added p50':>9}")
        plain_call = statistics.median(times[variants[0][0]])
        plain_list = statistics.median(times[variants[3][0]])
        for index, (name, *_) in enumerate(variants):
            base = None if index in (0, 3) else (plain_call if index < 3 else plain_list)
            print(_row(name, times[name], base))
        print("\n  in-process cost (Python, one core), µs per call:")
        for what, micros in _in_process(upstream, args.tools).items():
            print(f"  {what:42} {micros:8.1f}")
    except Exception:
        _, stats = stack.envoy.admin("/stats?filter=ext_proc|ext_authz|upstream_rq_5")
        print(stats.decode(), file=sys.stderr)
        raise
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
