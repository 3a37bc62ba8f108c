"""Decision records: one JSON object per line, to a file and/or stdout.

A record never holds a token or an API key: it is built from the :class:`~sidecar.decision.Decision`
fields that describe the call, never from ``headers_to_set``. Values are JSON-escaped, so a CR/LF in a
path or header stays inside its line.

Record fields: ``time`` (RFC 3339, UTC, ms), ``event`` (``"decision"``), ``decision_id``,
``request_id``, ``direction``, ``agent``, ``caller`` (ingress: the verified caller), ``task_id``,
``on_behalf_of``, ``method``, ``host``, ``port``,
``path`` (no query), ``rule``, ``decision`` (``allow``/``deny``), ``reason``, ``status``, ``detail``,
``token`` (``{"jti", "aud", "exp", "cached"}`` or null), ``latency_us``, ``protocol`` (``http``, or
``tls``/``tcp`` for a connection), ``sni`` (TLS server name), ``destination`` (``ip:port`` the agent
connected to: the original destination behind the transparent listener).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from sidecar.decision import Decision

__all__ = ["DecisionLog", "decision_record"]


def decision_record(decision: Decision, *, request_id: str, latency_us: int, now: float) -> dict[str, Any]:
    """The loggable fields of a decision, in a stable order."""
    token = decision.token
    return {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "decision_id": decision.decision_id,
        "request_id": request_id,
        "direction": decision.direction.value,
        "agent": decision.agent,
        "caller": decision.caller,
        "task_id": decision.task_id,
        "on_behalf_of": decision.on_behalf_of,
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
        "latency_us": latency_us,
        "protocol": decision.protocol.value,
        "sni": decision.sni,
        "destination": decision.destination,
    }


class _Sinks:
    """The structlog "logger": writes each rendered line to every sink."""

    def __init__(self, streams: list[IO[bytes]]) -> None:
        self._streams = streams
        self._lock = threading.Lock()

    def msg(self, line: bytes) -> None:
        data = line + b"\n"
        with self._lock:
            for stream in self._streams:
                stream.write(data)
                stream.flush()

    info = msg


def _render(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> bytes:
    return orjson.dumps(event_dict)


class DecisionLog:
    """Appends decision records.

    Args:
        path: a JSON-lines file to append to (created ``0640``), or ``None``.
        stdout: also write each record to standard output.

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: Path | None, *, stdout: bool) -> None:
        self.path = path
        streams: list[IO[bytes]] = []
        self._file: IO[bytes] | None = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = os.fdopen(fd, "ab", buffering=0)
            streams.append(self._file)
        if stdout:
            streams.append(sys.stdout.buffer)
        self._logger = structlog.wrap_logger(_Sinks(streams), processors=[_render], cache_logger_on_first_use=True)

    def write(self, record: dict[str, Any]) -> None:
        """Write one record built by :func:`decision_record`.

        Raises:
            OSError: the write failed (the caller fails closed).
        """
        self._logger.info("decision", **record)

    def close(self) -> None:
        """Close the file sink."""
        if self._file is not None:
            self._file.close()
            self._file = None
