"""The ext_authz HTTP service on a real socket: ordered answers, hostile bytes, oversized checks, fsync."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools

from sidecar.audit.log import DecisionLog
from sidecar.decision import AuthzRequest, Decision, Reason
from sidecar.envoy_authz.http_server import start_http_service
from sidecar.envoy_authz.service import AuthorizationService
from tests.support.envoy_authz import http_check


def _decide(request: AuthzRequest, decision_id: str) -> Decision:
    """Allow ``/ok*``, deny the rest; the method is echoed in the path of the decision."""
    allowed = request.path.startswith("/ok")
    return Decision(
        allowed,
        Reason.ALLOWED if allowed else Reason.PATH_NOT_ALLOWED,
        200 if allowed else 403,
        decision_id,
        method=request.method,
        path=request.path,
        headers_to_set=(("x-seen-method", request.method),) if allowed else (),
    )


class _Answers:
    """Every answer in a byte stream, in order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._headers: dict[str, str] = {}
        self._parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode()] = value.decode()

    def on_message_complete(self) -> None:
        self.items.append({"status": self._parser.get_status_code(), **self._headers})
        self._headers = {}


def _serve(tmp: Path, scenario: Callable[[str], Awaitable[None]], *, fsync: bool = False) -> list[dict[str, Any]]:
    """Run the service on ``tmp/h.sock`` while ``scenario(path)`` talks to it; the decision records."""
    log = DecisionLog(tmp / "decisions.log", stdout=False, fsync=fsync)

    async def main() -> None:
        service = AuthorizationService(_decide, log)
        server, _ = await start_http_service(service, f"unix:{tmp / 'h.sock'}")
        try:
            await asyncio.wait_for(scenario(str(tmp / "h.sock")), 20)
        finally:
            server.close()
            await log.aclose()

    asyncio.run(main())
    return [json.loads(line) for line in (tmp / "decisions.log").read_text().splitlines()]


async def _exchange(path: str, raw: bytes, answers: int) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(path)
    parsed = _Answers()
    writer.write(raw)
    while len(parsed.items) < answers:
        data = await reader.read(65536)
        assert data, f"closed after {len(parsed.items)} answers"
        parsed.feed(data)
    writer.close()
    return parsed.items


def test_pipelined_checks_are_answered_in_order(short_dir: Path) -> None:
    got: list[list[dict[str, Any]]] = []

    async def scenario(path: str) -> None:
        raw = http_check(path="/ok/1") + http_check(path="/no") + http_check(path="/ok/2", method="POST")
        got.append(await _exchange(path, raw, 3))

    records = _serve(short_dir, scenario)
    assert [a["status"] for a in got[0]] == [200, 403, 200]
    assert [a["decision_id"] for a in got[0]] == [r["decision_id"] for r in records]
    assert got[0][2]["x-seen-method"] == "POST"


def test_a_method_llhttp_does_not_know_is_judged_as_sent(short_dir: Path) -> None:
    got: list[list[dict[str, Any]]] = []

    async def scenario(path: str) -> None:
        got.append(await _exchange(path, http_check(method="FROBNICATE", path="/ok"), 1))
        got.append(await _exchange(path, http_check(method="PURGE", path="/ok") + http_check(path="/ok"), 2))
        reader, writer = await asyncio.open_unix_connection(path)
        raw = http_check(method="REPORT-X", path="/ok")
        writer.write(raw[:3])  # the method split across reads
        await asyncio.sleep(0.05)
        writer.write(raw[3:])
        parsed = _Answers()
        while not parsed.items:
            parsed.feed(await reader.read(65536))
        got.append(parsed.items)
        writer.close()

    _serve(short_dir, scenario)
    assert got[0][0]["x-seen-method"] == "FROBNICATE"
    assert [a["x-seen-method"] for a in got[1]] == ["PURGE", "GET"]
    assert got[2][0]["x-seen-method"] == "REPORT-X"


def test_bytes_that_are_not_http_close_the_connection_and_nothing_else(short_dir: Path) -> None:
    got: list[Any] = []

    async def scenario(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        got.append(await reader.read())  # EOF: closed without an answer
        writer.close()
        got.append(await _exchange(path, http_check(path="/ok"), 1))  # the service still answers

    records = _serve(short_dir, scenario)
    assert got[0] == b"" and got[1][0]["status"] == 200
    assert len(records) == 1


def test_oversized_and_undecodable_checks_are_recorded_bad_requests(short_dir: Path) -> None:
    got: list[list[dict[str, Any]]] = []

    async def scenario(path: str) -> None:
        huge = http_check(headers={f"h{i}": "v" * 1000 for i in range(100)})
        latin = http_check(path="/ok").replace(b"x-request-id: 42", b"x-request-id: \xff\xfe")
        got.append(await _exchange(path, huge + latin + http_check(direction=None), 3))

    records = _serve(short_dir, scenario)
    assert [a["status"] for a in got[0]] == [400, 400, 400]
    assert [r["reason"] for r in records] == ["bad_request"] * 3
    assert "96 KiB" in records[0]["detail"] and "UTF-8" in records[1]["detail"]


def test_upgrade_and_connect_checks_are_answered_and_the_connection_goes_on(short_dir: Path) -> None:
    got: list[list[dict[str, Any]]] = []

    async def scenario(path: str) -> None:
        upgrade = http_check(path="/ok", headers={"connection": "upgrade", "upgrade": "websocket"})
        got.append(await _exchange(path, upgrade + http_check(path="/ok/after"), 2))

    records = _serve(short_dir, scenario)
    assert [a["status"] for a in got[0]] == [200, 200]
    assert [r["path"] for r in records] == ["/ok", "/ok/after"]


def test_connection_close_is_honoured(short_dir: Path) -> None:
    got: list[Any] = []

    async def scenario(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(http_check(path="/ok", headers={"connection": "close"}))
        got.append(await reader.read())  # the answer, then EOF
        writer.close()

    _serve(short_dir, scenario)
    assert got[0].startswith(b"HTTP/1.1 200 OK\r\n")


def test_with_fsync_answers_wait_for_their_record_and_keep_their_order(short_dir: Path) -> None:
    got: list[list[dict[str, Any]]] = []

    async def scenario(path: str) -> None:
        raw = b"".join(http_check(path=p) for p in ("/ok/1", "/no", "/ok/3", "/no/4"))
        got.append(await _exchange(path, raw, 4))

    records = _serve(short_dir, scenario, fsync=True)
    assert [a["status"] for a in got[0]] == [200, 403, 200, 403]
    assert [a["decision_id"] for a in got[0]] == [r["decision_id"] for r in records]
