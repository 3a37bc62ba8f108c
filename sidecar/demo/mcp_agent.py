"""An unmodified agent using the official MCP and A2A clients: ``python -m sidecar.demo.mcp_agent PLAN``.

``PLAN`` is a JSON list of steps; each step is run by the SDK's own client, which reaches the
network through the standard ``HTTP_PROXY`` variable (httpx honours it), so Envoy sees exactly
what the SDK sends. One JSON line is printed per step: ``{"step", "ok", "result" | "error"}``.

Steps: ``{"mcp": URL, "mode": "auto"|"legacy", "calls": [[op, args...], ...]}`` with ops
``list_tools``, ``call_tool NAME ARGS``, ``read_resource URI``, ``get_prompt NAME ARGS``; and
``{"a2a": URL, "text": TEXT}`` (one ``SendMessage``) or ``{"a2a": URL, "get_task": ID}``
(one ``GetTask``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

__all__ = ["main", "run_plan"]


def _error(exc: BaseException) -> dict[str, Any]:
    error = getattr(exc, "error", None)
    if error is not None:
        return {
            "code": getattr(error, "code", None),
            "message": getattr(error, "message", str(exc)),
            "data": getattr(error, "data", None),
        }
    return {"code": None, "message": f"{type(exc).__name__}: {exc}"}


async def _mcp(step: dict[str, Any]) -> list[dict[str, Any]]:
    from mcp import Client

    out: list[dict[str, Any]] = []
    async with Client(step["mcp"], mode=step.get("mode", "auto"), raise_exceptions=True) as client:
        for op, *args in step["calls"]:
            entry: dict[str, Any] = {"step": [op, *args]}
            try:
                if op == "list_tools":
                    result = await client.list_tools()
                    entry["result"] = [t.name for t in result.tools]
                elif op == "call_tool":
                    called = await client.call_tool(args[0], args[1])
                    entry["result"] = called.structured_content or [getattr(c, "text", "") for c in called.content]
                    if called.is_error:
                        raise RuntimeError(f"tool error: {entry['result']}")
                elif op == "read_resource":
                    read = await client.read_resource(args[0])
                    entry["result"] = [getattr(c, "text", "") for c in read.contents]
                elif op == "get_prompt":
                    prompt = await client.get_prompt(args[0], args[1])
                    entry["result"] = [getattr(m.content, "text", "") for m in prompt.messages]
                else:
                    raise ValueError(f"unknown op {op!r}")
                entry["ok"] = True
            except Exception as exc:
                entry.update(ok=False, error=_error(exc))
            out.append(entry)
    return out


async def _a2a(step: dict[str, Any]) -> list[dict[str, Any]]:
    from a2a.client import ClientConfig, create_client
    from a2a.helpers.proto_helpers import get_message_text, new_text_message
    from a2a.types import a2a_pb2

    entry: dict[str, Any] = {"step": ["a2a", step.get("text") or f"get_task {step.get('get_task')}"]}
    try:
        client = await create_client(step["a2a"], ClientConfig(streaming=False))
        if "get_task" in step:
            task = await client.get_task(a2a_pb2.GetTaskRequest(id=step["get_task"]))
            entry.update(ok=True, result=[task.id])
            return [entry]
        texts = []
        request = a2a_pb2.SendMessageRequest(message=new_text_message(step["text"]))
        async for event in client.send_message(request):
            if event.HasField("message"):
                texts.append(get_message_text(event.message))
        entry.update(ok=True, result=texts)
    except Exception as exc:
        entry.update(ok=False, error=_error(exc))
    return [entry]


async def run_plan(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every step; a failing step is reported, never raised."""
    results: list[dict[str, Any]] = []
    for step in plan:
        try:
            results.extend(await (_mcp(step) if "mcp" in step else _a2a(step)))
        except Exception as exc:  # the connection itself failed (e.g. the first request denied)
            results.append({"step": ["connect", step.get("mcp") or step.get("a2a")], "ok": False, "error": _error(exc)})
    return results


def main() -> None:
    """Entry point: the plan is ``argv[1]`` (JSON); results go to stdout as JSON lines."""
    for result in asyncio.run(run_plan(json.loads(sys.argv[1]))):
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
