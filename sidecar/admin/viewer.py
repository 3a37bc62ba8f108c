"""The decision viewer on the admin port: ``/decisions`` (a page) and its JSON/SSE API.

Routes:
    ``GET /decisions`` - the page (plain HTML, JS and CSS shipped in the package; works offline).
    ``GET /decisions/static/{name}`` - its assets.
    ``GET /decisions/api/records`` - recent records, newest first. Query: ``task``, ``agent``, ``caller``,
        ``decision``, ``reason``, ``tool`` (an MCP tool, resource or prompt), ``since``/``until``
        (RFC 3339, or a duration back from now such as ``15m``), ``limit`` (default 200, at most 2000).
    ``GET /decisions/api/records/{decision_id}`` - one record (404 when not among the recent ones).
    ``GET /decisions/api/stream`` - Server-Sent Events: each new record matching the same filters, as
        an ``event: decision`` with the record as JSON ``data``; an ``event: tasks`` (data ``{}``)
        whenever the tasks, delegations or revocations seen here change (the page then reloads the
        summary and the delegation trees).
    ``GET /decisions/api/summary`` - per task: allowed and denied calls by destination, budget used/max.
    ``GET /decisions/api/tree`` - the delegation trees (:mod:`sidecar.admin.delegation_tree`) and the
        logs they are drawn from.
    ``GET /decisions/api/chain`` - the chain-verification status of the log files on disk.
    ``GET /decisions/api/approvals`` - the approvals known here (waiting, granted, used) and the calls
        they bind.
    ``POST /decisions/api/approvals/{id}`` - the approve button: approve the waiting call ``id`` for one
        retry (JSON body ``{"ttl": "10m"}``, optional). Only for an operator: the request must carry
        ``Authorization: Bearer <operator token>`` - a JWS signed by a root issuer key or an approver's
        SVID for this agent (``agent-authz approve --operator-token``); anyone else (the agent
        included) gets 403 and a ``not_authorized`` record.

The viewer keeps the last :data:`RECENT` records in memory as their JSON, at most ``viewer.recent_bytes``
of it (loaded from the end of the log at start, then fed by the decision log); older ones are for
``agent-authz logs``. With ``viewer.logs`` it also
reads other sidecars' decision logs (their tail at start, then followed like ``tail -F`` in a thread)
and shows their records with its own; their chains are verified by ``agent-authz logs verify``, not
here. This sidecar's chain is verified by ``agent-authz logs verify --expect SEQ:HASH`` in a child
process (another core, never the event loop), at most once per :data:`CHAIN_CHECK_INTERVAL` seconds
and only while someone asks; ``--expect`` pins the head the sidecar last wrote, so records deleted
from the end of the file are caught too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import sse_response

from sidecar.admin.control_api import control_error
from sidecar.admin.delegation_tree import delegation_trees
from sidecar.audit.log import DecisionLog
from sidecar.audit.reader import RecordFilter, follow_lines, log_files, tail_lines, tail_records, time_bound
from sidecar.config.durations import parse_duration
from sidecar.control.documents import ControlCode, ControlError
from sidecar.decision import Reason
from sidecar.policy.model import SENSITIVITY_NAMES
from sidecar.runtime.control import ControlService
from sidecar.runtime.tasks import TaskService

__all__ = [
    "CHAIN_CHECK_INTERVAL",
    "RECENT",
    "RECENT_BYTES",
    "TASKS_CHECK_INTERVAL",
    "DecisionFeed",
    "add_viewer_routes",
]

_log = structlog.get_logger("agent_authz.viewer")

RECENT = 10_000
"""Records the viewer keeps in memory (at most; ``viewer.recent_bytes`` bounds their size too)."""
RECENT_BYTES = 8 * 1024 * 1024
"""Bytes of JSON the viewer keeps by default (``viewer.recent_bytes``)."""
CHAIN_CHECK_INTERVAL = 5.0
"""Seconds between two chain verifications (results are reused in between)."""
TASKS_CHECK_INTERVAL = 0.5
"""Seconds between two looks for changed tasks, delegations or revocations (while a page listens)."""
_MAX_DESTINATIONS = 200
"""Per task; further destinations are counted under ``(other)``."""
_QUEUE = 1000
_RECORD_BYTES = 2048
"""Bytes read per record wanted from the end of another sidecar's log (records are ~0.5-1 KB)."""
_STATIC = Path(__file__).with_name("static")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'"
)


_Event = tuple[str, dict[str, Any]]
"""``(SSE event name, data)``."""


@dataclass(eq=False)
class _Subscriber:
    filter: RecordFilter
    queue: asyncio.Queue[_Event | None] = field(default_factory=lambda: asyncio.Queue(_QUEUE))
    overflowed: bool = False


class DecisionFeed:
    """Recent records, per-task counts and live subscribers; a :class:`DecisionLog` listener.

    The recent records are kept as their JSON (``orjson`` bytes: the line the decision log wrote),
    at most ``capacity`` of them and at most ``max_bytes`` of JSON in all (the oldest go first); they
    are decoded when asked for (:meth:`query`, :meth:`get`, :meth:`records`). A record larger than
    ``max_bytes`` on its own is not kept (it is still counted and sent to live pages). The per-task
    counts cover every record seen.

    Args:
        initial: records already on disk, oldest first: each a record, or the line of one as this
            sidecar's decision log wrote it (``orjson``; decoded one at a time, and kept as it is
            when its ``event`` is ``decision``, else skipped).
        capacity: how many records to keep.
        max_bytes: how many bytes of JSON to keep (``viewer.recent_bytes``).
    """

    def __init__(
        self, initial: Iterable[dict[str, Any] | bytes], capacity: int = RECENT, max_bytes: int = RECENT_BYTES
    ) -> None:
        self._recent: deque[bytes] = deque()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._bytes = 0
        self._by_task: dict[str, dict[str, list[int]]] = {}
        self._subscribers: set[_Subscriber] = set()
        for item in initial:
            if isinstance(item, bytes):
                try:
                    record = orjson.loads(item)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("event") == "decision":
                    self._add(record, item, exact=True)
            else:
                self._add(item, None)

    def _keep(self, raw: bytes, exact: bool) -> None:
        size = len(raw) - raw.endswith(b"\n")
        if size > self._max_bytes:
            return
        # orjson's bytes keep their whole write buffer (~8 KiB for a 1 KB record): kept as a copy of
        # exactly their size (a slice); ``exact``: ``raw`` is such a copy already (a line read from disk)
        line = raw[:size] if size < len(raw) else raw if exact else bytes(memoryview(raw))
        recent = self._recent
        recent.append(line)
        self._bytes += size
        while len(recent) > self._capacity or self._bytes > self._max_bytes:
            self._bytes -= len(recent.popleft())

    def _add(self, record: dict[str, Any], line: bytes | None, exact: bool = False) -> None:
        self._keep(orjson.dumps(record) if line is None else line, exact and line is not None)
        if record.get("direction") == "control":  # an operator's step or a quarantine, not a call
            return
        task, host, port = record.get("task_id"), record.get("host"), record.get("port")
        task = task if isinstance(task, str) else ""  # other sidecars' logs (viewer.logs) may hold anything
        host = host if isinstance(host, str) and host else "-"
        destinations = self._by_task.setdefault(task, {})
        where = f"{host}:{port}" if isinstance(port, int) and port not in (0, 80) else host
        if where not in destinations and len(destinations) >= _MAX_DESTINATIONS:
            where = "(other)"
        counts = destinations.setdefault(where, [0, 0])
        counts[0 if record.get("decision") == "allow" else 1] += 1

    def publish(self, record: dict[str, Any], line: bytes | None = None) -> None:
        """Take one new record (called by the decision log right after writing it).

        Args:
            record: the record.
            line: its JSON exactly as :func:`orjson.dumps` writes it (the decision log's line, a
                trailing newline allowed), kept instead of serializing ``record`` again; ``None``:
                serialize it here.
        """
        self._add(record, line)
        self._send(("decision", record), lambda s: s.filter.matches(record))

    def notify_tasks(self) -> None:
        """Tell every live page that tasks, delegations or revocations changed."""
        self._send(("tasks", {}), lambda _: True)

    def _send(self, event: _Event, wanted: Callable[[_Subscriber], bool]) -> None:
        for subscriber in self._subscribers:
            if wanted(subscriber):
                try:
                    subscriber.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscriber.overflowed = True
        for subscriber in [s for s in self._subscribers if s.overflowed]:
            self._subscribers.discard(subscriber)

    def query(self, selected: RecordFilter, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` matching records, newest first (decoded; only those that may match are)."""
        needles = _needles(selected)
        found: list[dict[str, Any]] = []
        for line in reversed(self._recent):
            if all(needle in line for needle in needles):
                record = orjson.loads(line)
                if selected.matches(record):
                    found.append(record)
                    if len(found) >= limit:
                        break
        return found

    def records(self) -> list[dict[str, Any]]:
        """The recent records, oldest first (decoded: a copy)."""
        return [orjson.loads(line) for line in self._recent]

    def __len__(self) -> int:
        """How many records are kept."""
        return len(self._recent)

    @property
    def size(self) -> int:
        """Bytes of JSON kept (at most ``max_bytes``)."""
        return self._bytes

    @property
    def listening(self) -> bool:
        """Whether any page is connected."""
        return bool(self._subscribers)

    def get(self, decision_id: str) -> dict[str, Any] | None:
        """The recent record with this id (decoded), if any."""
        needle = b'"decision_id":' + orjson.dumps(decision_id)
        for line in reversed(self._recent):
            if needle in line:
                record: dict[str, Any] = orjson.loads(line)
                if record.get("decision_id") == decision_id:
                    return record
        return None

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


def _needles(selected: RecordFilter) -> list[bytes]:
    """Byte strings every line that ``selected`` matches contains (a record's JSON as orjson writes it:
    ``"key":value`` without spaces); a line without one of them need not be decoded."""
    needles = [
        b'"' + key + b'":' + orjson.dumps(value)
        for key, value in (
            (b"task_id", selected.task),
            (b"agent", selected.agent),
            (b"caller", selected.caller),
            (b"decision", selected.decision),
            (b"reason", selected.reason),
        )
        if value is not None
    ]
    for value in (selected.tool, selected.rpc_method):
        if value is not None:
            needles.append(b":" + orjson.dumps(value))
    return needles


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


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("event") == "decision" else None


class _OtherLogs:
    """Other sidecars' decision logs (``viewer.logs``): their tail at start, then followed, one thread each.

    Read-only: a file that is missing, unreadable or holds lines that are not records is reported
    in :attr:`status` and otherwise skipped.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.status: dict[Path, dict[str, Any]] = {p: {"path": str(p), "records": 0, "error": None} for p in paths}
        self._positions: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def history(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` records of each log (rotated files included), oldest first per log."""
        out: list[dict[str, Any]] = []
        for path in self.paths:
            self._positions[path] = (0, 0)  # not there yet: follow it from its first line once it is
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                self.status[path]["error"] = "not there (yet)"
                continue
            except OSError as exc:
                self.status[path]["error"] = exc.strerror
                continue
            try:
                with path.open("rb") as handle:  # up to the size seen: the follower goes on from there
                    start = max(0, stat.st_size - count * _RECORD_BYTES)
                    handle.seek(start)
                    current = handle.read(stat.st_size - start).splitlines()[1 if start else 0 :][-count:]
                records = [r for r in map(_parse, current) if r is not None]
                rotated = [f for f in log_files(path) if f != path]
                if len(records) < count and rotated:
                    earlier = [r for r in tail_records(rotated, count - len(records)) if r.get("event") == "decision"]
                    records = earlier + records
            except OSError as exc:
                self.status[path]["error"] = exc.strerror
                continue
            self._positions[path] = (stat.st_ino, stat.st_size)
            self.status[path].update(records=len(records), error=None)
            out.extend(records)
        return out

    def start(self, publish: Callable[[dict[str, Any]], None], loop: asyncio.AbstractEventLoop) -> None:
        """Follow every log from where :meth:`history` stopped; records go to ``publish`` on ``loop``."""
        for path in self.paths:
            thread = threading.Thread(
                target=self._follow, args=(path, publish, loop), name=f"viewer-log:{path.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _follow(self, path: Path, publish: Callable[[dict[str, Any]], None], loop: asyncio.AbstractEventLoop) -> None:
        status = self.status[path]
        try:
            for raw in follow_lines(path, position=self._positions.get(path, (0, 0)), stop=self._stop.is_set):
                record = _parse(raw)
                if record is not None:
                    status["records"] += 1
                    status["error"] = None
                    loop.call_soon_threadsafe(publish, record)
        except (OSError, RuntimeError) as exc:  # RuntimeError: the loop closed at shutdown
            status["error"] = str(exc)

    def stop(self) -> None:
        """End the threads (each notices within its poll interval)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)


class _TasksWatch:
    """Sends ``event: tasks`` to live pages when what the delegation trees show may have changed.

    Looks every :data:`TASKS_CHECK_INTERVAL` seconds (only while a page listens): a new snapshot
    (reload, grant accepted, revocation), a new delegation or revocation issued here, or a task
    crossing its ``not_before`` or ``expires_at``.
    """

    def __init__(self, tasks: TaskService, feed: DecisionFeed) -> None:
        self._tasks = tasks
        self._feed = feed
        self._task: asyncio.Task[None] | None = None

    def _version(self) -> tuple[int, ...]:
        runtime = self._tasks.runtime
        now = runtime.clock()
        tasks = runtime.snapshot.policy.tasks_by_id.values()
        delegations = self._tasks.delegations()
        outside = sum(1 for t in tasks if not t.not_before <= now < t.expires_at)
        outside += sum(1 for d in delegations if d.spec.expires_at is not None and now >= d.spec.expires_at.timestamp())
        approvals = runtime.approvals.all()
        closed = sum(1 for a in approvals if a.state.value != "pending")
        return (
            id(runtime.snapshot),
            len(delegations),
            len(self._tasks.revoked_here()),
            outside,
            len(runtime.ladder),
            id(runtime.blocks),
            len(approvals),
            closed,
        )

    async def _run(self) -> None:
        version = self._version()
        while True:
            await asyncio.sleep(TASKS_CHECK_INTERVAL)
            if not self._feed.listening:
                continue
            current = self._version()
            if current != version:
                version = current
                self._feed.notify_tasks()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class _ViewerState:
    feed: DecisionFeed
    tasks: TaskService
    chain: _ChainChecker
    own_log: Path | None
    others: _OtherLogs
    control: ControlService


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
                item = await subscriber.queue.get()
                if item is None:
                    break
                name, data = item
                if name == "decision":
                    await response.send(_dumps(data), event=name, id=str(data.get("seq", "")))
                else:
                    await response.send(_dumps(data), event=name)
                if subscriber.overflowed and subscriber.queue.empty():
                    await response.send("{}", event="overflow")
                    break
        return response
    finally:
        state.feed.unsubscribe(subscriber)


async def _summary(request: web.Request) -> web.Response:
    state = request.app[_VIEWER]
    runtime = state.tasks.runtime
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
            block = runtime.blocks.get(task.id)
            entry.update(
                agent=task.agent,
                on_behalf_of=task.on_behalf_of,
                purpose=task.purpose,
                max_sensitivity=None if task.max_sensitivity is None else SENSITIVITY_NAMES[task.max_sensitivity],
                blocked=None if block is None else {"reason": block[0].value, "detail": block[1]},
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


async def _tree(request: web.Request) -> web.Response:
    state = request.app[_VIEWER]
    body = delegation_trees(state.tasks, state.feed.records())
    body["logs"] = {
        "own": None if state.own_log is None else str(state.own_log),
        "others": list(state.others.status.values()),
        "window": f"the last {len(state.feed)} records",
    }
    return web.json_response(body, dumps=_dumps)


async def _chain(request: web.Request) -> web.Response:
    return web.json_response(await request.app[_VIEWER].chain.status(), dumps=_dumps)


async def _approvals(request: web.Request) -> web.Response:
    control = request.app[_VIEWER].control
    return web.json_response({"approvals": [a.listing() for a in control.approvals()]}, dumps=_dumps)


async def _approve(request: web.Request) -> web.Response:
    control = request.app[_VIEWER].control
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    ttl: float | None = None
    try:
        raw = await request.read()
        body = orjson.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        if body.get("ttl") is not None:
            ttl = parse_duration(body["ttl"])
    except (ValueError, TypeError) as exc:
        return web.json_response({"error": "bad_request", "detail": f"ttl: {exc}"}, status=400)
    if scheme.lower() != "bearer" or not token.strip():
        missing = ControlError(ControlCode.NOT_AUTHORIZED, "approving needs an operator token (Authorization: Bearer)")
        return control_error(control.refused(missing, "operator approval", request.path))
    try:
        approval = control.approve_as(token.strip(), request.match_info["approval_id"], ttl)
    except ControlError as exc:
        return control_error(exc)
    return web.json_response(approval.listing(), dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def add_viewer_routes(
    app: web.Application, tasks: TaskService, decision_log: DecisionLog, control: ControlService | None = None
) -> DecisionFeed:
    """Add the viewer of ``tasks`` (its runtime and the sub-grants it issued) to ``app`` and subscribe it
    to ``decision_log`` (and follow ``viewer.logs``); its approve button goes to ``control`` (a
    :class:`ControlService` of the same runtime by default).

    Loads the last :data:`RECENT` records from the log files first (this sidecar's and the others').

    Returns:
        The feed (the decision log's listener).
    """
    loaded = tasks.runtime.snapshot.loaded
    path = decision_log.path
    lines: list[bytes] = []
    if path is not None:
        try:
            lines = tail_lines(log_files(path), RECENT)
        except OSError as exc:
            _log.warning("viewer_history_unreadable", error=str(exc))
    own = path.resolve() if path is not None else None
    others = _OtherLogs([p for p in (loaded.resolve(p) for p in loaded.settings.viewer.logs) if p.resolve() != own])
    earlier = others.history(RECENT)
    initial: list[dict[str, Any]] | list[bytes] = lines
    if earlier:  # merged by time with the other sidecars' records
        mine = [r for r in map(orjson.loads, lines) if r.get("event") == "decision"]
        initial = sorted(mine + earlier, key=lambda r: str(r.get("time") or ""))
    del lines
    feed = DecisionFeed(initial, max_bytes=loaded.settings.viewer.recent_bytes)
    del initial
    decision_log.listeners.append(feed.publish)
    spec = loaded.settings.decision_log
    key_file = loaded.resolve(spec.hmac_key_file) if spec.hmac_key_file is not None else None
    operator = control if control is not None else ControlService(tasks.runtime)
    app[_VIEWER] = _ViewerState(feed, tasks, _ChainChecker(decision_log, key_file), path, others, operator)
    watch = _TasksWatch(tasks, feed)

    async def start(_: web.Application) -> None:
        others.start(feed.publish, asyncio.get_running_loop())
        watch.start()

    async def close_streams(_: web.Application) -> None:
        feed.close()
        await watch.stop()
        await asyncio.to_thread(others.stop)

    app.on_startup.append(start)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/decisions", _page)
    app.router.add_static("/decisions/static", _STATIC, append_version=False)
    app.router.add_get("/decisions/api/records", _records)
    app.router.add_get("/decisions/api/records/{decision_id}", _record)
    app.router.add_get("/decisions/api/stream", _stream)
    app.router.add_get("/decisions/api/summary", _summary)
    app.router.add_get("/decisions/api/tree", _tree)
    app.router.add_get("/decisions/api/chain", _chain)
    app.router.add_get("/decisions/api/approvals", _approvals)
    app.router.add_post("/decisions/api/approvals/{approval_id}", _approve)
    return feed
