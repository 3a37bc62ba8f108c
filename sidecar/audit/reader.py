"""Reading decision logs: the set of rotated files, filters, the tail, and following a live file.

A log at ``PATH`` is the current file ``PATH`` plus its rotated predecessors ``PATH.<N>``, where ``N``
is the ``seq`` of the first record in that file, written with 12 digits (``decisions.log.000000000000``,
``decisions.log.000000004711``, …). In chain order: the rotated files by ``N``, then ``PATH``. A file
copied off a pod on its own is simply a log without predecessors.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from sidecar.config.durations import parse_duration

_T = TypeVar("_T")

__all__ = [
    "RecordFilter",
    "follow_lines",
    "iter_lines",
    "iter_records",
    "last_chained",
    "log_files",
    "parse_time",
    "rotated_name",
    "tail_lines",
    "tail_records",
]

_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<seq>\d{12,})$")
_BLOCK = 64 * 1024


def rotated_name(path: Path, first_seq: int) -> Path:
    """The name ``path`` gets when rotated, given the ``seq`` of its first record."""
    return path.with_name(f"{path.name}.{first_seq:012d}")


def log_files(path: Path) -> list[Path]:
    """``path``'s rotated predecessors in chain order, then ``path`` itself (when it exists).

    A ``path`` that is itself a rotated file (``NAME.<12+ digits>``) stands alone.
    """
    if _ROTATED.match(path.name):
        return [path]
    rotated: list[tuple[int, Path]] = []
    directory = path.parent
    if directory.is_dir():
        prefix = path.name + "."
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix):
                match = _ROTATED.match(entry.name)
                if match is not None and match["base"] == path.name and entry.is_file():
                    rotated.append((int(match["seq"]), directory / entry.name))
    files = [p for _, p in sorted(rotated)]
    if path.exists():
        files.append(path)
    return files


def iter_lines(files: Iterable[Path]) -> Iterator[tuple[str, int, bytes]]:
    """``(file, line_number, raw_line)`` for every line of ``files`` in order (newline kept).

    All files are opened before the first line is read, so a rotation meanwhile (a rename) does not
    change what is read.

    Raises:
        OSError: a file cannot be opened or read.
    """
    handles = []
    try:
        for path in files:
            handles.append((str(path), path.open("rb")))
        for name, handle in handles:
            for number, raw in enumerate(handle, 1):
                yield name, number, raw
    finally:
        for _, handle in handles:
            handle.close()


def iter_records(lines: Iterable[tuple[str, int, bytes]]) -> Iterator[dict[str, Any]]:
    """The JSON objects among ``lines``; blank, torn and non-JSON lines are skipped (``verify`` reports them)."""
    for _, _, raw in lines:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def _reverse_lines(path: Path) -> Iterator[bytes]:
    """Lines of ``path`` from the last to the first, read backwards in 64 KiB blocks.

    Each line keeps its newline; a torn last line (no newline) comes first, without one.
    """
    with path.open("rb") as handle:
        pos = handle.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0:
            start = max(0, pos - _BLOCK)
            handle.seek(start)
            buf = handle.read(pos - start) + buf
            pos = start
            cut = buf.find(b"\n")
            if cut < 0 or (pos == 0 and cut == len(buf) - 1):
                continue  # the first segment may begin before ``start``: keep it for the next block
            body, buf = buf[cut + 1 :], buf[: cut + 1]
            parts = body.split(b"\n")
            if parts[-1]:
                yield parts[-1]
            for part in reversed(parts[:-1]):
                yield part + b"\n"
        if buf:
            yield buf


def last_chained(files: list[Path], *, scan: int = 1000) -> dict[str, Any] | None:
    """The last record with an integer ``seq`` and a string ``hash`` across ``files``, newest first.

    Torn or foreign lines at the end are skipped; at most ``scan`` lines are examined.
    """
    seen = 0
    for path in reversed(files):
        for raw in _reverse_lines(path):
            seen += 1
            if seen > scan:
                return None
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("seq"), int) and isinstance(record.get("hash"), str):
                return record
    return None


def _tail(files: list[Path], count: int, keep: Callable[[bytes, dict[str, Any]], _T]) -> list[_T]:
    """``keep(line, record)`` of up to the last ``count`` records across ``files``, oldest first
    (reads backwards, not the whole log; a line that is not a JSON object is skipped)."""
    found: list[_T] = []
    for path in reversed(files):
        for raw in _reverse_lines(path):
            if len(found) >= count:
                break
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                found.append(keep(raw, record))
        if len(found) >= count:
            break
    found.reverse()
    return found


def tail_lines(files: list[Path], count: int) -> list[bytes]:
    """The lines of the last ``count`` records across ``files`` (those :func:`tail_records` returns),
    oldest first, each without its newline: the records as bytes, never all decoded at once (10,000
    records are ~9 MB of lines and ~30 MB of dicts; the allocator keeps what a start peaked at)."""
    return _tail(files, count, lambda raw, _: raw[:-1] if raw.endswith(b"\n") else raw)


def tail_records(files: list[Path], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` last records across ``files``, oldest first (reads backwards, not the whole log)."""
    return _tail(files, count, lambda _, record: record)


def parse_time(value: str) -> float:
    """POSIX seconds of an RFC 3339 time (``Z`` or an offset; a time without offset is UTC).

    Raises:
        ValueError: not a time.
    """
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def time_bound(value: str, now: float) -> float:
    """A filter bound: an RFC 3339 time, or a duration (``15m``, ``2h``) counted back from ``now``.

    Raises:
        ValueError: neither.
    """
    try:
        return parse_time(value)
    except ValueError:
        pass
    try:
        return now - parse_duration(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is neither a duration (15m, 2h) nor an RFC 3339 time") from None


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records to show; every set criterion must match (``None`` = any).

    Attributes:
        task / agent / caller / reason: exact matches on ``task_id``, ``agent``, ``caller``, ``reason``.
        decision: ``"allow"`` or ``"deny"``.
        since / until: POSIX seconds bounds on the record's ``time`` (inclusive).
        tool: exact match on the MCP tool, resource or prompt the call named (``mcp.tool``,
            ``mcp.resource``, ``mcp.prompt``).
        rpc_method: exact match on the JSON-RPC method (``mcp.method`` or ``a2a.method``).
    """

    task: str | None = None
    agent: str | None = None
    caller: str | None = None
    decision: str | None = None
    reason: str | None = None
    since: float | None = None
    until: float | None = None
    tool: str | None = None
    rpc_method: str | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` passes every criterion (a record without a usable ``time`` fails time bounds)."""
        if self.tool is not None or self.rpc_method is not None:
            rpc = record.get("mcp") or record.get("a2a")
            if not isinstance(rpc, dict):
                return False
            if self.tool is not None and self.tool not in (rpc.get("tool"), rpc.get("resource"), rpc.get("prompt")):
                return False
            if self.rpc_method is not None and rpc.get("method") != self.rpc_method:
                return False
        if self.task is not None and record.get("task_id") != self.task:
            return False
        if self.agent is not None and record.get("agent") != self.agent:
            return False
        if self.caller is not None and record.get("caller") != self.caller:
            return False
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.reason is not None and record.get("reason") != self.reason:
            return False
        if self.since is not None or self.until is not None:
            try:
                when = parse_time(str(record.get("time")))
            except ValueError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        return True


def _identity(handle: IO[bytes]) -> tuple[int, int]:
    stat = os.fstat(handle.fileno())
    return stat.st_dev, stat.st_ino


def follow_lines(
    path: Path,
    *,
    position: tuple[int, int] | None = None,
    stop: Callable[[], bool] = lambda: False,
    interval: float = 0.2,
) -> Iterator[bytes]:
    """Yield complete lines appended to ``path`` as they arrive, like ``tail -F``.

    Follows rotation: when ``path`` is replaced by a new file (or shrinks), the rest of the old file
    is drained and reading restarts at the top of the new one.

    Args:
        path: the current log file (it may not exist yet).
        position: ``(inode, offset)`` already read: continue from there if ``path`` is still that
            file, else from the top of the file now at ``path``; ``None`` skips what is already there.
        stop: polled between reads; return ``True`` to end.
        interval: seconds between polls when nothing new arrived.
    """
    handle: IO[bytes] | None = None
    pending = b""
    first = True
    try:
        while not stop():
            if handle is None:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
                if first:
                    if position is None:
                        handle.seek(0, os.SEEK_END)
                    elif _identity(handle)[1] == position[0]:
                        handle.seek(position[1])
                first = False
                pending = b""
            chunk = handle.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line + b"\n"
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                stat = None
            if stat is None or (stat.st_dev, stat.st_ino) != _identity(handle) or stat.st_size < handle.tell():
                handle.close()
                handle = None  # rotated or truncated: reopen from the start
                continue
            time.sleep(interval)
    finally:
        if handle is not None:
            handle.close()
