"""The decision viewer on the admin port: ``/decisions`` (a page) and its JSON/SSE API.

Routes:
    ``GET /decisions`` - the page (plain HTML, JS and CSS shipped in the package; works offline).
    ``GET /decisions/static/{name}`` - its assets.
    ``GET /decisions/api/records`` - recent records, newest first. Query: ``task``, ``agent``, ``caller``,
        ``decision``, ``reason``, ``tool`` (an MCP tool, resource or prompt), ``since``/``until``
        (RFC 3339, or a duration back from now such as ``15m``), ``limit`` (default 200, at most 2000).
    ``GET /decisions/api/records/{decision_id}`` - one record (404 when not among the recent ones).
    ``GET /decisions/api/stream`` - Server-Sent Events: each new record matching the same filters, as
        an ``event: decision`` with the record as JSON ``data``.
    ``GET /decisions/api/summary`` - per task: allowed and denied calls by destination, budget used/max.
    ``GET /decisions/api/chain`` - the chain-verification status of the log files on disk.

The viewer keeps the last :data:`RECENT` records in memory (loaded from the end of the log at start,
then fed by the decision log); older ones are for ``agent-authz logs``. The chain is verified by
``agent-authz logs verify --expect SEQ:HASH`` in a child process (another core, never the event loop),
at most once per :data:`CHAIN_CHECK_INTERVAL` seconds and only while someone asks; ``--expect`` pins the
head the sidecar last wrote, so records deleted from the end of the file are caught too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import sse_response

from sidecar.audit.log import DecisionLog
from sidecar.audit.reader import RecordFilter, log_files, tail_records, time_bound
from sidecar.decision import Reason
from sidecar.runtime.active import Runtime

__all__ = ["CHAIN_CHECK_INTERVAL", "RECENT", "DecisionFeed", "add_viewer_routes"]

_log = structlog.get_logger("agent_authz.viewer")

RECENT = 10_000
"""Records the viewer keeps in memory."""
CHAIN_CHECK_INTERVAL = 5.0
"""Seconds between two chain verifications (results are reused in between)."""
_MAX_DESTINATIONS = 200
"""Per task; further destinations are counted under ``(other)``."""
_QUEUE = 1000
_STATIC = Path(__file__).with_name("static")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'"
)


@dataclass(eq=False)
class _Subscriber:
    filter: RecordFilter
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(_QUEUE))
    overflowed: bool = False


class DecisionFeed:
    """Recent records, per-task counts and live subscribers; a :class:`DecisionLog` listener.

    Args:
        initial: records already on disk, oldest first.
        capacity: how many records to keep.
    """

    def __init__(self, initial: list[dict[str, Any]], capacity: int = RECENT) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._by_task: dict[str, dict[str, list[int]]] = {}
        self._subscribers: set[_Subscriber] = set()
        for record in initial:
            self._add(record)

    def _add(self, record: dict[str, Any]) -> None:
        self._recent.append(record)
        task = record.get("task_id") or ""
        destinations = self._by_task.setdefault(task, {})
        host, port = record.get("host") or "-", record.get("port")
        where = host if port in (None, 0, 80) else f"{host}:{port}"
        if where not in destinations and len(destinations) >= _MAX_DESTINATIONS:
            where = "(other)"
        counts = destinations.setdefault(where, [0, 0])
        counts[0 if record.get("decision") == "allow" else 1] += 1

    def publish(self, record: dict[str, Any]) -> None:
        """Take one new record (called by the decision log right after writing it)."""
        self._add(record)
        for subscriber in self._subscribers:
            if subscriber.filter.matches(record):
                try:
                    subscriber.queue.put_nowait(record)
                except asyncio.QueueFull:
                    subscriber.overflowed = True
        for subscriber in [s for s in self._subscribers if s.overflowed]:
            self._subscribers.discard(subscriber)

    def query(self, selected: RecordFilter, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` matching records, newest first."""
        found: list[dict[str, Any]] = []
        for record in reversed(self._recent):
            if selected.matches(record):
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    def get(self, decision_id: str) -> dict[str, Any] | None:
        """The recent record with this id, if any."""
        return next((r for r in reversed(self._recent) if r.get("decision_id") == decision_id), None)

    def counts(self) -> dict[str, dict[str, list[int]]]:
        """``task_id -> destination -> [allowed, denied]`` over every record seen."""
        return self._by_task

    def subscribe(self, selected: RecordFilter) -> _Subscriber:
        """Start receiving matching records."""
        subscriber = _Subscriber(selected)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        """Stop receiving records."""
        self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every live stream (shutdown)."""
        for subscriber in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                subscriber.queue.put_nowait(None)
        self._subscribers.clear()


class _ChainChecker:
    """Runs ``agent-authz logs verify`` in a child process; one at a time, results reused briefly."""

    def __init__(self, log: DecisionLog, key_file: Path | None) -> None:
        self._log = log
        self._key_file = key_file
        self._result: dict[str, Any] | None = None
        self._checked = 0.0
        self._running: asyncio.Task[dict[str, Any]] | None = None

    async def status(self) -> dict[str, Any]:
        path = self._log.path
        if path is None:
            return {"status": "unavailable", "message": "records go to stdout only; there is no file to verify"}
        if self._result is not None and time.monotonic() - self._checked < CHAIN_CHECK_INTERVAL:
            return self._result
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._verify(path))
        result = await asyncio.shield(self._running)
        self._result, self._checked = result, time.monotonic()
        return result

    async def _verify(self, path: Path) -> dict[str, Any]:
        head = self._log.head
        argv = [sys.executable, "-m", "sidecar", "logs", "verify", "--json", "--partial", str(path)]
        if head.seq >= 0:
            argv += ["--expect", f"{head.seq}:{head.hash}"]
        if self._key_file is not None:
            argv += ["--key", str(self._key_file)]
        if not log_files(path):
            return {"status": "intact", "records": 0, "head_seq": None, "first_seq": None, "message": "no records yet"}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        try:
            body = orjson.loads(out)
        except orjson.JSONDecodeError:
            _log.error("chain_verify_failed", code=proc.returncode, stderr=err.decode(errors="replace")[-500:])
            return {"status": "error", "message": err.decode(errors="replace").strip()[-300:] or "verify failed"}
        head_info = body.get("head") or {}
        return {
            "status": "intact" if body["intact"] else "broken",
            "records": body["records"],
            "first_seq": body["first_seq"],
            "head_seq": head_info.get("seq"),
            "head_hash": head_info.get("hash"),
            "break": body["break"],
            "message": "" if body["first_seq"] in (None, 0) else "earlier records are not on disk (rotated away)",
        }


@dataclass
class _ViewerState:
    feed: DecisionFeed
    runtime: Runtime
    chain: _ChainChecker


_VIEWER: web.AppKey[_ViewerState] = web.AppKey("viewer", _ViewerState)


def _filter_from(query: Any) -> RecordFilter:
    now = time.time()

    def bound(name: str) -> float | None:
        value = query.get(name) or None
        if value is None:
            return None
        try:
            return time_bound(value, now)
        except ValueError:
            raise web.HTTPBadRequest(text=f"{name}: expected an RFC 3339 time or a duration such as 15m") from None

    decision = query.get("decision") or None
    if decision not in (None, "allow", "deny"):
        raise web.HTTPBadRequest(text="decision: expected allow or deny")
    return RecordFilter(
        task=query.get("task") or None,
        agent=query.get("agent") or None,
        caller=query.get("caller") or None,
        decision=decision,
        reason=query.get("reason") or None,
        since=bound("since"),
        until=bound("until"),
        tool=query.get("tool") or None,
    )


async def _page(_: web.Request) -> web.FileResponse:
    return web.FileResponse(
        _STATIC / "viewer.html", headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP}
    )


async def _records(request: web.Request) -> web.Response:
    state = request.app[_VIEWER]
    selected = _filter_from(request.query)
    try:
        limit = max(1, min(2000, int(request.query.get("limit", "200"))))
    except ValueError:
        raise web.HTTPBadRequest(text="limit: expected a number") from None
    records = state.feed.query(selected, limit)
    return web.json_response({"records": records, "reasons": [r.value for r in Reason]}, dumps=_dumps)


async def _record(request: web.Request) -> web.Response:
    record = request.app[_VIEWER].feed.get(request.match_info["decision_id"])
    if record is None:
        raise web.HTTPNotFound(text="no recent record with this decision_id")
    return web.json_response(record, dumps=_dumps)


async def _stream(request: web.Request) -> web.StreamResponse:
    state = request.app[_VIEWER]
    selected = _filter_from(request.query)
    subscriber = state.feed.subscribe(selected)
    try:
        async with sse_response(request) as response:
            await response.send("{}", event="ready")
            while response.is_connected():
                record = await subscriber.queue.get()
                if record is None:
                    break
                await response.send(_dumps(record), event="decision", id=str(record.get("seq", "")))
                if subscriber.overflowed and subscriber.queue.empty():
                    await response.send("{}", event="overflow")
                    break
        return response
    finally:
        state.feed.unsubscribe(subscriber)


async def _summary(request: web.Request) -> web.Response:
    state = request.app[_VIEWER]
    runtime = state.runtime
    tasks = runtime.snapshot.policy.tasks_by_id
    counts = state.feed.counts()
    out = []
    for task_id in list(tasks) + sorted(t for t in counts if t not in tasks):
        task = tasks.get(task_id)
        destinations = counts.get(task_id, {})
        entry: dict[str, Any] = {
            "task_id": task_id or None,
            "declared": task is not None,
            "destinations": [
                {"destination": where, "allowed": allowed, "denied": denied}
                for where, (allowed, denied) in sorted(destinations.items())
            ],
            "allowed": sum(c[0] for c in destinations.values()),
            "denied": sum(c[1] for c in destinations.values()),
        }
        if task is not None:
            entry.update(
                agent=task.agent,
                on_behalf_of=task.on_behalf_of,
                purpose=task.purpose,
                expires_at=task.expires_at,
                revoked=task.revoked,
                budget={"used": runtime.budgets.used((task.id, "")), "max": task.max_calls},
                rules=[
                    {"rule": rule.name, "used": runtime.budgets.used((task.id, rule.budget_key)), "max": rule.max_calls}
                    for rule in task.rules
                ],
            )
        out.append(entry)
    return web.json_response(
        {"tasks": out, "dry_run": runtime.snapshot.loaded.settings.dry_run, "window": "records since start"},
        dumps=_dumps,
    )


async def _chain(request: web.Request) -> web.Response:
    return web.json_response(await request.app[_VIEWER].chain.status(), dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def add_viewer_routes(app: web.Application, runtime: Runtime, decision_log: DecisionLog) -> DecisionFeed:
    """Add the viewer to ``app`` and subscribe it to ``decision_log``.

    Loads the last :data:`RECENT` records from the log files first.

    Returns:
        The feed (the decision log's listener).
    """
    path = decision_log.path
    initial: list[dict[str, Any]] = []
    if path is not None:
        try:
            initial = [r for r in tail_records(log_files(path), RECENT) if r.get("event") == "decision"]
        except OSError as exc:
            _log.warning("viewer_history_unreadable", error=str(exc))
    feed = DecisionFeed(initial)
    decision_log.listeners.append(feed.publish)
    spec = runtime.snapshot.loaded.settings.decision_log
    key_file = runtime.snapshot.loaded.resolve(spec.hmac_key_file) if spec.hmac_key_file is not None else None
    app[_VIEWER] = _ViewerState(feed, runtime, _ChainChecker(decision_log, key_file))

    async def close_streams(_: web.Application) -> None:
        feed.close()

    app.on_shutdown.append(close_streams)
    app.router.add_get("/decisions", _page)
    app.router.add_static("/decisions/static", _STATIC, append_version=False)
    app.router.add_get("/decisions/api/records", _records)
    app.router.add_get("/decisions/api/records/{decision_id}", _record)
    app.router.add_get("/decisions/api/stream", _stream)
    app.router.add_get("/decisions/api/summary", _summary)
    app.router.add_get("/decisions/api/chain", _chain)
    return feed
