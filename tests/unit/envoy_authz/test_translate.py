"""Protocol edge: CheckRequest parsing, CheckResponse building, and the service's fail-closed paths."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from sidecar import wire
from sidecar.audit.log import DecisionLog
from sidecar.decision import AuthzRequest, Decision, Direction, Interception, Reason, TokenInfo
from sidecar.envoy_authz.service import AuthorizationService
from sidecar.envoy_authz.translate import build_check_response, parse_check_request
from sidecar.errors import BadRequestError
from tests.support.config import API_HOST
from tests.support.envoy_authz import check_request


def test_parse_check_request() -> None:
    parsed = parse_check_request(check_request(headers={"x-request-id": "rid", "x-agent-task": "t"}))
    assert parsed.direction is Direction.EGRESS
    assert (parsed.method, parsed.authority, parsed.path, parsed.scheme) == ("GET", API_HOST, "/v1/items/1", "http")
    assert parsed.request_id == "rid"
    assert parsed.headers["x-agent-task"] == "t"


def test_context_extensions_become_typed_fields() -> None:
    plain = parse_check_request(check_request())
    assert plain.interception is None and not plain.upstream_tls and not plain.via_connect
    context = {
        wire.CONTEXT_INTERCEPT: "api.example.com:8443",
        wire.CONTEXT_UPSTREAM_VERIFY: "dns:api.example.com ca:/ca.pem",
        wire.CONTEXT_UPSTREAM_TLS: wire.ORIGINATE,
    }
    parsed = parse_check_request(check_request(context=context))
    assert parsed.interception == Interception("api.example.com", 8443, "dns:api.example.com ca:/ca.pem")
    assert parsed.interception.target == "api.example.com:8443"
    assert parsed.upstream_tls
    assert not parse_check_request(check_request(context={wire.CONTEXT_UPSTREAM_TLS: "plain"})).upstream_tls


@pytest.mark.parametrize(
    "target", ["api.example.com", "api.example.com:", ":443", "api.example.com:0", "a:99999", "a:४४३"]
)
def test_a_malformed_intercept_context_is_a_bad_request(target: str) -> None:
    with pytest.raises(BadRequestError, match="intercept must be host:port"):
        parse_check_request(check_request(context={wire.CONTEXT_INTERCEPT: target}))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff\xff\xff\xff garbage", "undecodable"),
        (check_request(http=False), "no HTTP attributes"),
        (check_request(direction=None), "direction"),
        (check_request(direction="sideways"), "direction"),
        (check_request(method=""), "malformed HTTP method"),
        (check_request(method="G\x00ET"), "malformed HTTP method"),
        (check_request(headers={f"h{i}": "v" * 1000 for i in range(100)}), "larger than 96 KiB without"),
        (b"\x00" * (96 * 1024 + (1 << 20) + 2), "larger than"),  # more than 96 KiB besides a body of 1 MiB + 1
    ],
)
def test_bad_check_requests(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequestError, match=why):
        parse_check_request(raw)


def test_non_utf8_header_value_is_rejected() -> None:
    # hand-built protobuf: a map entry whose value is not UTF-8 (upb refuses it)
    good = check_request(headers={"x-k": "AAAA"})
    bad = good.replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    with pytest.raises(BadRequestError, match="undecodable"):
        parse_check_request(bad)


def _response(raw: bytes) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(raw)


def test_allow_response_overwrites_and_removes() -> None:
    decision = Decision(
        True,
        Reason.ALLOWED,
        200,
        "d1",
        task_id="t",
        headers_to_set=(("authorization", "Bearer x"), ("x-api-key", "k")),
        headers_to_remove=("x-agent-task", "proxy-authorization"),
        token=TokenInfo("j", "aud", 1, False),
    )
    response = _response(build_check_response(decision))
    assert response.status.code == code_pb2.OK
    headers = {h.header.key: h for h in response.ok_response.headers}
    assert headers["authorization"].header.value == "Bearer x"
    assert headers["authorization"].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(response.ok_response.headers_to_remove) == ["x-agent-task", "proxy-authorization"]
    assert response.ok_response.response_headers_to_add[0].header.value == "d1"
    assert response.dynamic_metadata["decision_id"] == "d1"
    assert response.dynamic_metadata["task_id"] == "t"


@pytest.mark.parametrize(
    ("reason", "status"), [(Reason.PATH_NOT_ALLOWED, 403), (Reason.BUDGET_EXHAUSTED, 429), (Reason.BAD_REQUEST, 400)]
)
def test_deny_response(reason: Reason, status: int) -> None:
    response = _response(build_check_response(Decision(False, reason, status, "d2")))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == status
    assert json.loads(response.denied_response.body) == {"decision_id": "d2", "reason": reason.value}
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert headers["x-agent-authz-decision-id"] == "d2"
    assert headers["x-agent-authz-reason"] == reason.value
    assert headers["content-type"] == "application/json"
    assert response.dynamic_metadata["decision"] == "deny"


class _Recorder:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "decisions.log"
        self.log = DecisionLog(self.path, stdout=False)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[_Recorder]:
    rec = _Recorder(tmp_path)
    yield rec
    rec.log.close()


def _allow_all(request: AuthzRequest, decision_id: str) -> Decision:
    return Decision(
        True,
        Reason.ALLOWED,
        200,
        decision_id,
        path=request.path,
        headers_to_set=(("authorization", "Bearer SECRET-TOKEN"),),
    )


def _explode(request: AuthzRequest, decision_id: str) -> Decision:
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize("raw", [b"\x08\x96\x01garbage", b"", check_request(http=False), check_request(direction=None)])
def test_service_denies_garbage_with_bad_request(recorder: _Recorder, raw: bytes) -> None:
    response = _response(AuthorizationService(_allow_all, recorder.log).check_bytes(raw))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 400
    (record,) = recorder.records()
    assert record["decision"] == "deny" and record["reason"] == "bad_request"


def test_service_denies_on_internal_error(recorder: _Recorder) -> None:
    response = _response(AuthorizationService(_explode, recorder.log).check_bytes(check_request()))
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert recorder.records()[0]["reason"] == "internal_error"


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_full_device_fails_closed_unless_told_otherwise(policy: str, capsys: pytest.CaptureFixture[str]) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    log = DecisionLog(Path("/dev/full"), stdout=False)  # every write: ENOSPC
    service = AuthorizationService(_allow_all, log, on_log_failure=policy)  # type: ignore[arg-type]
    response = _response(service.check_bytes(check_request()))
    if policy == "deny":
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert response.denied_response.status.code == 403
        assert response.dynamic_metadata["reason"] == "internal_error"
    else:
        assert response.status.code == code_pb2.OK
    assert not log.healthy and log.write_errors["file"] == 1 and "No space left" in (log.last_error or "")
    assert log.head.seq == -1  # nothing was chained
    event = capsys.readouterr().err
    assert "decision_log_write_failed" in event and response.dynamic_metadata["decision_id"] in event
    assert "SECRET-TOKEN" not in event
    log.close()


def test_records_hold_no_token_and_crlf_stays_on_one_line(recorder: _Recorder) -> None:
    service = AuthorizationService(_allow_all, recorder.log)
    service.check_bytes(check_request(path='/a\r\nX-Injected: yes\n{"decision":"allow"}'))
    text = recorder.path.read_text()
    assert text.count("\n") == 1
    assert "SECRET-TOKEN" not in text
    (record,) = recorder.records()
    assert record["path"].startswith("/a\r\nX-Injected")
