"""Decision records: one hash-chained JSON object per line, to a file and/or stdout.

A record never holds a token or an API key: it is built from the :class:`~sidecar.decision.Decision`
fields that describe the call, never from ``headers_to_set``. Values are JSON-escaped, so a CR/LF in a
path or header stays inside its line.

Record fields are listed, with their meaning, in :data:`RECORD_FIELDS` next to the builder
(:func:`decision_record`); ``docs/reference/records.md`` is generated from it by ``scripts/gen_docs.py``,
and a test checks that the builder and the chain write exactly these fields.

Durability (``decision_log.fsync``): each record is written with one ``write(2)`` to an ``O_APPEND``
file *before* Envoy gets the answer, so an answered decision survives a crash or SIGTERM of the
sidecar (the kernel holds it). With ``fsync: true`` the answer also waits for ``fsync(2)``, so it
survives power loss; concurrent decisions share one ``fsync`` (group commit, run in a worker thread so
the event loop keeps deciding). There is no queue of unwritten records, so shutdown has nothing to
drop. A failed write leaves no torn line (the file is truncated back) and raises
:class:`~sidecar.errors.DecisionLogError`; the caller fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson
import structlog

from sidecar.audit.chain import ChainHead, link
from sidecar.audit.reader import last_chained, log_files, parse_time, rotated_name
from sidecar.decision import Decision, Reason
from sidecar.errors import DecisionLogError

__all__ = ["RECORD_FIELDS", "DecisionLog", "RecordField", "decision_record"]

_log = structlog.get_logger("agent_authz.audit")


class RecordField(NamedTuple):
    """One field of a decision record: its JSON name, JSON type and meaning."""

    name: str
    type: str
    meaning: str


RECORD_FIELDS: tuple[RecordField, ...] = (
    RecordField("time", "string", "When the decision was made: RFC 3339, UTC, milliseconds."),
    RecordField(
        "decision_id", "string", "Unique id; also in ``x-agent-authz-decision-id`` and Envoy's dynamic metadata."
    ),
    RecordField("request_id", "string", "Envoy's ``x-request-id``."),
    RecordField(
        "direction",
        "string",
        "``egress`` (the agent calls out), ``ingress`` (someone calls the agent), ``local`` (the agent asked "
        "its task API; ``method`` and ``path`` are the API call's) or ``control`` (an operator's signed action or "
        "approval, or a quarantine: not a call).",
    ),
    RecordField(
        "agent", "string or null", "This sidecar's agent (SPIFFE ID): the caller on egress, the callee on ingress."
    ),
    RecordField("caller", "string or null", "Ingress: the verified caller's SPIFFE ID."),
    RecordField("task_id", "string or null", "The task the call was judged against."),
    RecordField(
        "txn", "string or null", "The root task's id (a delegation chain's transaction id; the token's ``txn``)."
    ),
    RecordField(
        "act", "array of strings", "Egress: the actors' SPIFFE IDs, current first (the token's nested ``act``)."
    ),
    RecordField("on_behalf_of", "string or null", "The user or principal the task serves (the token's ``sub``)."),
    RecordField("purpose", "string or null", "The task's ``purpose``: why the agent makes the call."),
    RecordField(
        "sensitivity",
        "string or null",
        "The label of what the call reaches (``public``, ``internal``, ``confidential``, ``restricted``): the "
        "deciding rule's or its host's, else ``sensitivity.default`` - the token's ``sensitivity`` claim.",
    ),
    RecordField("method", "string", "HTTP method; empty for a connection check."),
    RecordField("host", "string", "The normalized host the call was judged on and routed to."),
    RecordField("port", "integer", "The port the call was judged on."),
    RecordField("path", "string", "The normalized path, never the query string."),
    RecordField("rule", "string or null", "Name of the rule that decided (allowed, or charged the budget)."),
    RecordField("decision", "string", "``allow`` or ``deny``: the answer given to Envoy."),
    RecordField("reason", "string", "The reason code (``docs/reference/reasons.md``)."),
    RecordField(
        "status",
        "integer",
        "The HTTP status: 200 on allow, the reason's status on deny; 0 for a DNS query and for a connection "
        "Envoy closed.",
    ),
    RecordField("detail", "string", "A short human explanation (never secret material)."),
    RecordField("token", "object or null", "The injected token: ``{jti, aud, exp, cached}`` - never the token itself."),
    RecordField(
        "remaining",
        "integer or null",
        "Calls left under the tightest ``max_calls`` of the deciding rule (after this call; 0 on "
        "``budget_exhausted``); null when no limit applies.",
    ),
    RecordField("latency_us", "integer", "Time to decide, microseconds."),
    RecordField(
        "protocol",
        "string",
        "``http``; ``tls``/``tcp`` for a connection the transparent listener asked about; ``dns`` for a query the "
        "sidecar's DNS proxy answered.",
    ),
    RecordField("sni", "string", "The TLS server name, when there was one."),
    RecordField(
        "destination",
        "string",
        "The ``ip:port`` the agent connected to (behind the transparent listener, the original destination).",
    ),
    RecordField(
        "mcp",
        "object",
        "Only on an MCP route: ``{method, tool | resource | prompt, decided_from (headers or body), "
        "arguments_digest (sha256: of the canonical JSON arguments), arguments (only the rule's ``record`` "
        "pointers)}``; ``response: true`` for the client's answer to a server request. Never other argument values.",
    ),
    RecordField(
        "a2a", "object", "Only on an A2A route: ``{method, decided_from}`` (the JSON-RPC method, e.g. ``SendMessage``)."
    ),
    RecordField(
        "tls",
        "string",
        "Only on a request read by intercepting the agent's TLS: ``intercept`` (``sni`` is the intercepted name).",
    ),
    RecordField(
        "upstream_verify",
        "string",
        "Only with ``tls``: how Envoy verifies the upstream it re-originates to, ``dns:<host> ca:<bundle>``; the "
        "outcome is Envoy's access-log field ``upstream_tls_failure`` for the same ``decision_id``.",
    ),
    RecordField(
        "qtype",
        "string",
        "Only on a DNS query (``protocol: dns``; ``host`` is the name): the query type, e.g. ``A``, ``AAAA``, ``TXT``.",
    ),
    RecordField(
        "connect",
        "string",
        "Only on a request inside a proxy ``CONNECT`` tunnel: the ``host:port`` the ``CONNECT`` named (its own "
        "decision is the record with ``method: CONNECT``).",
    ),
    RecordField(
        "peer",
        "string",
        "Only on ingress with a JWT-SVID: the mTLS peer's SPIFFE ID (``caller`` is the JWT-SVID's subject; both are "
        "recorded, also when they differ and the call is denied).",
    ),
    RecordField(
        "approval",
        "object",
        "Only when an approval is involved: ``{id, status (pending, approved, consumed, expired, stale), "
        "expires_at, approved_by, approved_at, used_by}`` - the approval this call created, used, or was "
        "refused for; on an ``approval_granted`` control record the approval granted.",
    ),
    RecordField(
        "action",
        "object",
        "Only on a ``control`` record: ``{kind (freeze, unfreeze, kill), target (agent:ID, task:ID, subtree:ID), "
        "by, root, action_id, at, reason, evidence (the decision ids that tripped a quarantine), source}``.",
    ),
    RecordField("dry_run", "boolean", "Only in dry-run mode: ``true``."),
    RecordField("would_decision", "string", "Only in dry-run mode: what the policy decided (``allow`` or ``deny``)."),
    RecordField("would_reason", "string", "Only in dry-run mode: the policy's reason code."),
    RecordField("event", "string", "Always ``decision`` (operational events go to stderr)."),
    RecordField("seq", "integer", "Position in the hash chain: 0, 1, 2, ... without gaps, across rotated files."),
    RecordField("prev_hash", "string", "The ``hash`` of the record before (64 zeros for ``seq`` 0)."),
    RecordField(
        "hash",
        "string",
        "Lower-case hex SHA-256 (or HMAC-SHA256 with ``decision_log.hmac_key_file``) of the canonical record.",
    ),
)
"""Every field a decision record can carry, in the order written (see :func:`decision_record` and
:func:`sidecar.audit.chain.link`, which adds ``seq``, ``prev_hash`` and ``hash``)."""


def decision_record(decision: Decision, *, request_id: str, latency_us: int, now: float) -> dict[str, Any]:
    """The loggable fields of a decision, in a stable order (chain fields are added when written)."""
    token = decision.token
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "decision_id": decision.decision_id,
        "request_id": request_id,
        "direction": decision.direction.value,
        "agent": decision.agent,
        "caller": decision.caller,
        "task_id": decision.task_id,
        "txn": decision.txn,
        "act": list(decision.act_chain),
        "on_behalf_of": decision.on_behalf_of,
        "purpose": decision.purpose,
        "sensitivity": decision.sensitivity,
        "method": decision.method,
        "host": decision.host,
        "port": decision.port,
        "path": decision.path,
        "rule": decision.rule,
        "decision": "allow" if decision.allow else "deny",
        "reason": decision.reason.value,
        "status": decision.http_status,
        "detail": decision.detail,
        "token": None
        if token is None
        else {"jti": token.jti, "aud": token.aud, "exp": token.exp, "cached": token.cached},
        "remaining": decision.remaining,
        "latency_us": latency_us,
        "protocol": decision.protocol.value,
        "sni": decision.sni,
        "destination": decision.destination,
    }
    if decision.rpc is not None:
        record[decision.rpc_protocol or "mcp"] = dict(decision.rpc)
    if decision.tls:
        record["tls"] = decision.tls
        record["upstream_verify"] = decision.upstream_verify
    if decision.qtype:
        record["qtype"] = decision.qtype
    if decision.connect:
        record["connect"] = decision.connect
    if decision.peer is not None:
        record["peer"] = decision.peer
    if decision.approval is not None:
        record["approval"] = dict(decision.approval)
    if decision.action is not None:
        record["action"] = dict(decision.action)
    if decision.dry_run and decision.would_reason is not None:
        record["dry_run"] = True
        record["would_decision"] = "allow" if decision.would_reason is Reason.ALLOWED else "deny"
        record["would_reason"] = decision.would_reason.value
    record["event"] = "decision"
    return record


class DecisionLog:
    """Appends hash-chained decision records; rotates; continues the chain after a restart.

    Args:
        path: the JSON-lines file (created ``0640``), or ``None`` for stdout only.
        stdout: also write each record to standard output (the cluster-friendly default).
        fsync: make each record durable (``fsync``) before :meth:`sync` returns (group commit).
        hmac_key: chain with HMAC-SHA256 under this key instead of plain SHA-256.
        max_bytes: rotate before a record would make the file larger than this (bytes).
        max_age: rotate before writing to a file whose first record is this old (seconds).
        keep: rotated files to keep (the oldest are deleted); ``None`` keeps all.
        clock: POSIX seconds.
        stdout_stream: where stdout records go (default ``sys.stdout.buffer``).

    Attributes:
        head: the last record written (``seq`` -1 before the first).
        healthy: whether the last write (and sync) succeeded.
        last_error: the message of the last failure, ``None`` once a write succeeds again.
        write_errors: failed writes by sink (``"file"``, ``"stdout"``).
        rotations: files rotated by this process.
        listeners: called with each record and its JSON line (bytes, as written, newline included)
            after it is written (the viewer's live feed).

    Raises:
        DecisionLogError: ``path`` cannot be opened or its last record cannot be read.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        stdout: bool,
        fsync: bool = False,
        hmac_key: bytes | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
        keep: int | None = None,
        clock: Callable[[], float] = time.time,
        stdout_stream: IO[bytes] | None = None,
    ) -> None:
        self.path = path
        self.fsync = fsync and path is not None
        self._key = hmac_key
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._keep = keep
        self._clock = clock
        self._stdout: IO[bytes] | None = (stdout_stream or sys.stdout.buffer) if stdout else None
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._file_first_seq: int | None = None
        self._file_started: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.head = ChainHead.start()
        self.healthy = True
        self.last_error: str | None = None
        self.write_errors = {"file": 0, "stdout": 0}
        self.rotations = 0
        self.listeners: list[Callable[[dict[str, Any], bytes], None]] = []
        if path is not None:
            try:
                self._resume(path)
            except OSError as exc:
                raise DecisionLogError(f"decision log {path}: {exc.strerror or exc}") from None

    # -- opening and resuming -------------------------------------------------------------------

    def _open(self) -> int:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._dirty = False
        return fd

    def _resume(self, path: Path) -> None:
        """Open ``path`` and continue the chain from the last record on disk (this file or a rotated one)."""
        fd = self._open()
        if self._size:
            with path.open("rb") as handle:
                first = handle.readline()
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            if torn:  # a record cut short by a crash: keep it as evidence, start the next one on its own line
                os.write(fd, b"\n")
                self._size += 1
                _log.warning("decision_log_torn_tail", path=str(path))
            try:
                head = orjson.loads(first)
                self._file_first_seq = int(head["seq"])
                self._file_started = parse_time(str(head["time"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._file_first_seq = None
        last = last_chained(log_files(path))
        if last is not None:
            self.head = ChainHead(last["seq"], last["hash"])
        elif self._size:
            _log.warning("decision_log_unchained", path=str(path), detail="no chained record found; starting a chain")
        if self.head.seq >= 0:
            _log.info("decision_log_resumed", path=str(path), seq=self.head.seq)

    # -- writing --------------------------------------------------------------------------------

    def _fail(self, message: str, sink: str) -> DecisionLogError:
        self.healthy = False
        self.last_error = message
        self.write_errors[sink] += 1
        return DecisionLogError(message, sink=sink)

    def _repair(self, fd: int) -> None:
        """After a failed write: drop a torn partial record, or at least end its line."""
        size = os.fstat(fd).st_size
        if size > self._size:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                os.write(fd, b"\n")
                self._size = size + 1
        else:
            self._size = size
        self._dirty = False

    def _rotate(self, fd: int, next_seq: int) -> int:
        assert self.path is not None
        first = self._file_first_seq if self._file_first_seq is not None else next_seq
        target = rotated_name(self.path, first)
        if target.exists():
            raise FileExistsError(f"cannot rotate: {target} exists")
        if self.fsync:
            os.fsync(fd)
        os.rename(self.path, target)
        os.close(fd)
        self._fd = None
        self.rotations += 1
        self._file_first_seq = None
        self._file_started = None
        _log.info("decision_log_rotated", path=str(self.path), rotated=str(target))
        self._prune()
        return self._open()

    def _prune(self) -> None:
        if self._keep is None or self.path is None:
            return
        rotated = [p for p in log_files(self.path) if p != self.path]
        for old in rotated[: max(0, len(rotated) - self._keep)]:
            try:
                old.unlink()
            except OSError as exc:
                _log.warning("decision_log_prune_failed", path=str(old), error=str(exc))

    def _write_file(self, line: bytes, seq: int, now: float) -> None:
        fd = self._fd if self._fd is not None else self._open()
        if self._dirty:
            self._repair(fd)
        too_big = self._max_bytes is not None and self._size + len(line) > self._max_bytes
        started = self._file_started
        too_old = self._max_age is not None and started is not None and now - started >= self._max_age
        if self._size and (too_big or too_old):
            fd = self._rotate(fd, seq)
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            self._dirty = True
            with contextlib.suppress(OSError):
                self._repair(fd)
            raise
        self._size += len(line)
        if self._file_first_seq is None:
            self._file_first_seq = seq
            self._file_started = now

    def append(self, record: dict[str, Any]) -> None:
        """Chain ``record`` (adds ``seq``, ``prev_hash``, ``hash``) and write it to every sink.

        With a file sink, a stdout failure is counted and reported but does not fail the record
        (the file is the record of truth); with stdout alone, it does.

        Raises:
            DecisionLogError: the record was not written; the chain head is unchanged.
        """
        now = self._clock()
        try:
            line, head = link(record, self.head, self._key)
        except TypeError as exc:
            raise self._fail(f"record cannot be serialized: {exc}", "file") from None
        if self.path is not None:
            try:
                self._write_file(line, head.seq, now)
            except OSError as exc:
                raise self._fail(f"cannot write {self.path}: {exc.strerror or exc}", "file") from None
        if self._stdout is not None:
            try:
                self._stdout.write(line)
                self._stdout.flush()
            except (OSError, ValueError) as exc:
                error = self._fail(f"cannot write stdout: {exc}", "stdout")
                if self.path is None:
                    raise error from None
                _log.error("decision_log_stdout_failed", error=str(exc))
        self.head = head
        if not self.fsync:
            self.healthy = True
            self.last_error = None
        for listener in self.listeners:
            listener(record, line)

    # -- durability -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Wait until every record appended so far is on stable storage (``fsync: true`` only).

        Concurrent callers share one ``fsync`` (group commit) run in a worker thread.

        Raises:
            DecisionLogError: the ``fsync`` failed.
        """
        if not self.fsync:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="decision-log-fsync")
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            waiters, self._waiters = self._waiters, []
            error: DecisionLogError | None = None
            try:
                if self._fd is None:
                    raise OSError("the log file is not open")
                dup = os.dup(self._fd)  # a rotation may close the original meanwhile
                try:
                    await loop.run_in_executor(None, os.fsync, dup)
                finally:
                    os.close(dup)
            except OSError as exc:
                error = self._fail(f"cannot fsync {self.path}: {exc.strerror or exc}", "file")
            else:
                self.healthy = True
                self.last_error = None
            for waiter in waiters:
                if not waiter.done():
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)

    async def aclose(self) -> None:
        """Finish pending syncs, then close the file."""
        if self._flusher is not None:
            await self._flusher
        self.close()

    def close(self) -> None:
        """Close the file sink (stdout stays open)."""
        if self._fd is not None:
            if self.fsync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    _log.error("decision_log_fsync_failed", error=str(exc))
            os.close(self._fd)
            self._fd = None
