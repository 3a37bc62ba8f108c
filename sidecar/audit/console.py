"""``agent-authz logs``: show, filter, follow and verify decision logs.

``logs [PATH…]`` prints the records of each log (its rotated files in chain order, then the current
file) as an aligned table, or as JSON lines with ``--json``; without a PATH it reads standard input
(e.g. ``kubectl logs POD -c agent-authz | agent-authz logs``). ``logs verify [PATH…]`` checks the hash
chain (:mod:`sidecar.audit.chain`) and exits 0 when intact, 1 at the first broken link, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from sidecar.audit.chain import ChainHead, load_hmac_key, verify_lines
from sidecar.audit.reader import RecordFilter, follow_lines, iter_lines, iter_records, log_files, time_bound
from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = ["add_logs_arguments", "add_verify_arguments", "run_logs", "run_verify"]

_GREEN, _RED, _YELLOW, _DIM, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"
_COLUMNS: tuple[str, ...] = (
    "time",
    "decision",
    "reason",
    "task",
    "method",
    "destination",
    "status",
    "agent",
    "caller",
    "id",
)
_MAX_WIDTH = {"destination": 64, "agent": 56, "caller": 56, "task": 32}


class UsageError(AgentAuthzError):
    """Bad arguments or unreadable input (exit 2)."""

    code = ErrorCode.USAGE


def add_logs_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``agent-authz logs``."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help="decision log(s); rotated files are included")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    parser.add_argument("--task", help="only this task id")
    parser.add_argument("--agent", help="only this agent SPIFFE ID")
    parser.add_argument("--caller", help="only this caller SPIFFE ID (ingress)")
    parser.add_argument("--decision", choices=["allow", "deny"], help="only allows or denies")
    parser.add_argument("--reason", help="only this reason code, e.g. path_not_allowed")
    parser.add_argument("--tool", help="only calls of this MCP tool (or resource URI, or prompt)")
    parser.add_argument("--rpc-method", help="only this JSON-RPC method (MCP or A2A), e.g. tools/call")
    parser.add_argument("--since", help="a duration back from now (15m, 2h) or an RFC 3339 time")
    parser.add_argument("--until", help="a duration back from now or an RFC 3339 time")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``agent-authz logs verify``."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help="decision log(s); default: standard input")
    parser.add_argument("--key", help="file holding the HMAC key the log was written with")
    parser.add_argument("--partial", action="store_true", help="accept a chain that starts after seq 0")
    parser.add_argument("--expect", metavar="SEQ:HASH", help="a head known from elsewhere (e.g. /readyz)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _time_bound(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    try:
        return time_bound(value, now)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _expand(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        found = log_files(Path(name))
        if not found:
            raise UsageError(f"{name}: no such file")
        files.extend(f for f in found if f not in files)
    return files


def _stdin_lines() -> Iterator[tuple[str, int, bytes]]:
    for number, raw in enumerate(sys.stdin.buffer, 1):
        yield "-", number, raw


def _cell(record: dict[str, Any], column: str) -> str:
    if column == "decision":
        return str(record.get("decision", ""))
    if column == "reason":
        if record.get("dry_run"):
            return f"dry_run:{record.get('would_reason', '')}"
        return str(record.get("reason", ""))
    if column == "task":
        return str(record.get("task_id") or "-")
    if column == "destination":
        host, port = record.get("host") or "", record.get("port")
        where = host if port in (None, 0, 80) else f"{host}:{port}"
        rpc = record.get("mcp") or record.get("a2a")
        if isinstance(rpc, dict) and rpc.get("method"):
            named = rpc.get("tool") or rpc.get("resource") or rpc.get("prompt")
            return f"{where}{record.get('path', '')} [{rpc['method']}{' ' + str(named) if named else ''}]"
        return f"{where}{record.get('path', '')}" or "-"
    if column == "id":
        return str(record.get("decision_id", ""))[:8]
    value = record.get(column)
    return "-" if value in (None, "") else str(value)


def _fit(text: str, column: str) -> str:
    limit = _MAX_WIDTH.get(column)
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", " ")
    if limit is None or len(text) <= limit:
        return text
    if column in ("agent", "caller"):  # the workload name is at the end of a SPIFFE ID
        head = limit // 3
        return text[:head] + "…" + text[len(text) - (limit - head - 1) :]
    return text[: limit - 1] + "…"


class _Table:
    """Aligned rows; colour only on a terminal (and never with ``NO_COLOR``)."""

    def __init__(self, out: IO[str], columns: tuple[str, ...], colour: bool) -> None:
        self.out = out
        self.columns = columns
        self.colour = colour
        self.widths = {c: len(c) for c in columns}

    def rows(self, records: list[dict[str, Any]]) -> list[list[str]]:
        rows = [[_fit(_cell(r, c), c) for c in self.columns] for r in records]
        for row in rows:
            for column, text in zip(self.columns, row, strict=True):
                self.widths[column] = max(self.widths[column], len(text))
        return rows

    def _paint(self, column: str, text: str, record: dict[str, Any] | None) -> str:
        if not self.colour or record is None:
            return text
        if column == "decision":
            return f"{_GREEN if record.get('decision') == 'allow' else _RED}{text}{_RESET}"
        if column == "reason" and record.get("dry_run"):
            return f"{_YELLOW}{text}{_RESET}"
        if column in ("time", "id"):
            return f"{_DIM}{text}{_RESET}"
        return text

    def print_header(self) -> None:
        self._print([c.upper() for c in self.columns], None)

    def print_rows(self, records: list[dict[str, Any]], rows: list[list[str]]) -> None:
        for record, row in zip(records, rows, strict=True):
            self._print(row, record)

    def _print(self, row: list[str], record: dict[str, Any] | None) -> None:
        cells = [
            self._paint(column, text.ljust(self.widths[column]), record)
            for column, text in zip(self.columns, row, strict=True)
        ]
        self.out.write("  ".join(cells).rstrip() + "\n")
        self.out.flush()


def run_logs(args: argparse.Namespace) -> int:
    """``agent-authz logs``; returns the exit code.

    Raises:
        UsageError: bad arguments or a missing file.
    """
    now = time.time()
    selected = RecordFilter(
        task=args.task,
        agent=args.agent,
        caller=args.caller,
        decision=args.decision,
        reason=args.reason,
        since=_time_bound(args.since, now),
        until=_time_bound(args.until, now),
        tool=args.tool,
        rpc_method=args.rpc_method,
    )
    position: list[int] = [0, 0]  # inode and bytes read of the current file, where --follow goes on
    if args.paths:
        files = _expand(args.paths)
        with contextlib.suppress(OSError):
            position[0] = files[-1].stat().st_ino
        current = str(files[-1])

        def counted() -> Iterator[tuple[str, int, bytes]]:
            for item in iter_lines(files):
                if item[0] == current:
                    position[1] += len(item[2])
                yield item

        lines: Iterable[tuple[str, int, bytes]] = counted()
    elif not sys.stdin.isatty():
        files = []
        lines = _stdin_lines()
    else:
        raise UsageError("give a decision log PATH, or pipe records in (e.g. kubectl logs POD -c agent-authz | …)")
    records = [r for r in iter_records(lines) if r.get("event") == "decision" and selected.matches(r)]
    out = sys.stdout
    if args.json:
        for record in records:
            out.write(orjson.dumps(record).decode() + "\n")
        out.flush()
    else:
        columns: tuple[str, ...] = _COLUMNS
        if not args.caller and not any(r.get("caller") for r in records):
            columns = tuple(c for c in _COLUMNS if c != "caller")
        colour = out.isatty() and "NO_COLOR" not in os.environ
        table = _Table(out, columns, colour)
        rows = table.rows(records)
        table.print_header()
        table.print_rows(records, rows)
    if args.follow and files:
        try:
            for raw in follow_lines(files[-1], position=(position[0], position[1])):
                for record in iter_records([("", 0, raw)]):
                    if record.get("event") != "decision" or not selected.matches(record):
                        continue
                    if args.json:
                        out.write(orjson.dumps(record).decode() + "\n")
                        out.flush()
                    else:
                        table.print_rows([record], table.rows([record]))
        except KeyboardInterrupt:
            return 0
    return 0


def _parse_expect(value: str | None) -> ChainHead | None:
    if value is None:
        return None
    seq, sep, digest = value.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise UsageError(f"--expect must be SEQ:HASH (64 hex digits), got {value!r}")
    return ChainHead(int(seq), digest.lower())


def run_verify(args: argparse.Namespace) -> int:
    """``agent-authz logs verify``: 0 intact, 1 broken (first broken link reported), 2 bad input.

    Raises:
        UsageError: bad arguments or a missing file.
        KeyLoadError: the key file cannot be read.
    """
    key = load_hmac_key(Path(args.key), file="--key", field="") if args.key else None
    expect = _parse_expect(args.expect)
    if args.paths:
        files = _expand(args.paths)
        lines: Iterable[tuple[str, int, bytes]] = iter_lines(files)
        where = f"{len(files)} file(s)"
    else:
        lines = _stdin_lines()
        where = "standard input"
    try:
        result = verify_lines(lines, key=key, partial=args.partial, expect=expect)
    except OSError as exc:
        raise UsageError(f"cannot read: {exc}") from None
    if args.json:
        body: dict[str, Any] = {
            "intact": result.intact,
            "records": result.records,
            "first_seq": result.first_seq,
            "head": None if result.head is None else {"seq": result.head.seq, "hash": result.head.hash},
            "break": None,
        }
        if result.broken is not None:
            b = result.broken
            body["break"] = {"file": b.source, "line": b.line, "seq": b.seq, "kind": b.kind, "message": b.message}
        print(orjson.dumps(body).decode())
    elif result.broken is None:
        span = "" if result.head is None else f", seq {result.first_seq}..{result.head.seq}"
        head = "" if result.head is None else f"; head {result.head.hash}"
        print(f"intact: {result.records} records in {where}{span}{head}")
    else:
        b = result.broken
        at = f"{b.source}:{b.line}" if b.source else "end of log"
        seq = f" (seq {b.seq})" if b.seq is not None else ""
        print(f"BROKEN at {at}{seq}: {b.kind}: {b.message}")
        print(f"  {result.records} records verified before the break")
    return 0 if result.intact else 1
