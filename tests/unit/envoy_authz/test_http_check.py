"""HTTP checks: the check read into an AuthzRequest, the decision written as Envoy's answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httptools
import pytest

from sidecar import wire
from sidecar.audit.log import DecisionLog
from sidecar.decision import AuthzRequest, Decision, Direction, Interception, Reason, RpcRoute
from sidecar.envoy_authz.http_check import HttpCheck, build_http_answer, parse_http_check
from sidecar.envoy_authz.service import AuthorizationService
from sidecar.errors import BadRequestError
from tests.support.config import API_HOST
from tests.support.envoy_authz import http_check


class _Reader:
    """httptools callbacks filling an :class:`HttpCheck`, as the server's protocol does."""

    def __init__(self) -> None:
        self.check = HttpCheck()

    def on_url(self, url: bytes) -> None:
        self.check.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.check.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.check.body += body


def _read(raw: bytes) -> HttpCheck:
    reader = _Reader()
    parser = httptools.HttpRequestParser(reader)
    parser.feed_data(raw)
    reader.check.method = parser.get_method()
    return reader.check


def _parse(**kw: Any) -> AuthzRequest:
    return parse_http_check(_read(http_check(**kw)))


class _Answer:
    """An answer as Envoy reads it."""

    def __init__(self, raw: bytes) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""
        self.names: list[str] = []
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(raw)
        self.status = parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name.decode())
        self.headers[name.decode()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body


def test_a_check_becomes_the_request_envoy_saw() -> None:
    headers = {
        "x-agent-task": "t",
        "user-agent": "agent/1",
        wire.DESTINATION_HEADER: "10.0.0.7:80",
        wire.PEER_CERTIFICATE_HEADER: "-----BEGIN%20CERTIFICATE-----",
    }
    parsed = _parse(path="/v1/items/1?x=%20y", headers=headers)
    assert parsed.direction is Direction.EGRESS
    assert (parsed.method, parsed.authority, parsed.scheme) == ("GET", API_HOST, "http")
    assert parsed.path == "/v1/items/1?x=%20y"
    assert (parsed.request_id, parsed.destination) == ("42", "10.0.0.7:80")
    assert parsed.peer_certificate == "-----BEGIN%20CERTIFICATE-----"
    assert parsed.headers["x-agent-task"] == "t" and parsed.headers["user-agent"] == "agent/1"
    assert not any(name.startswith("x-agent-authz-") for name in parsed.headers)  # Envoy's, not the request's
    assert parsed.body is None and parsed.rpc is None and parsed.interception is None
    # the pseudo-headers as gRPC's CheckRequest has them (Envoy's header limits count them)
    pseudo = {k: v for k, v in parsed.headers.items() if k.startswith(":")}
    assert pseudo == {":authority": API_HOST, ":method": "GET", ":path": "/v1/items/1?x=%20y", ":scheme": "http"}
    assert "host" not in parsed.headers and parsed.connect == ""


def test_the_connect_authority_is_read_on_intercepting_routes_only() -> None:
    context = {wire.CONTEXT_INTERCEPT: "api.example.com:443"}
    inside = _parse(context=context, headers={wire.CONNECT_AUTHORITY_HEADER: "api.example.com:443"})
    assert inside.connect == "api.example.com:443"
    assert _parse(headers={wire.CONNECT_AUTHORITY_HEADER: "api.example.com:443"}).connect == ""


def test_the_route_context_becomes_typed_fields() -> None:
    context = {
        wire.CONTEXT_INTERCEPT: "api.example.com:8443",
        wire.CONTEXT_UPSTREAM_VERIFY: "dns:api.example.com ca:/ca.pem",
        wire.CONTEXT_UPSTREAM_TLS: wire.ORIGINATE,
    }
    parsed = _parse(context=context)
    assert parsed.interception == Interception("api.example.com", 8443, "dns:api.example.com ca:/ca.pem")
    assert parsed.upstream_tls
    mcp = _parse(method="POST", context={"rpc_protocol": "mcp", "rpc_body_cap": "2048"}, body=b'{"jsonrpc":"2.0"}')
    assert mcp.rpc == RpcRoute("mcp", 2048) and mcp.body == b'{"jsonrpc":"2.0"}'
    no_body = _parse(method="POST", context={"rpc_protocol": "a2a"}, body=b"{}")
    assert no_body.rpc == RpcRoute("a2a", 0) and no_body.body is None
    assert _parse(direction="ingress").direction is Direction.INGRESS


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"direction": None}, "no x-agent-authz-context"),
        ({"direction": "sideways"}, "direction"),
        ({"context": {"intercept": "a:0"}}, "intercept must be host:port"),
        ({"context": {"rpc_protocol": "soap"}}, "rpc_protocol"),
        ({"prefix": "/elsewhere"}, "not under the check prefix"),
    ],
)
def test_bad_checks(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(BadRequestError, match=why):
        _parse(**kw)


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"direction": 1}', '"egress"'])
def test_a_context_that_is_not_an_object_of_strings_is_a_bad_request(value: str) -> None:
    check = _read(http_check())
    check.headers[wire.CONTEXT_HEADER] = value
    with pytest.raises(BadRequestError, match="x-agent-authz-context"):
        parse_http_check(check)


@pytest.mark.parametrize("method", [b"G(ET", b"", b"X" * 33, "GÉT".encode()])
def test_a_malformed_method_is_a_bad_request(method: bytes) -> None:
    check = _read(http_check())
    check.method = method
    with pytest.raises(BadRequestError, match="method"):
        parse_http_check(check)


def test_a_problem_the_reader_flagged_is_a_bad_request() -> None:
    check = _read(http_check())
    check.problem = "a header of the check is not UTF-8"
    with pytest.raises(BadRequestError, match="not UTF-8"):
        parse_http_check(check)


ALLOW = Decision(
    True,
    Reason.ALLOWED,
    200,
    "d1",
    task_id="t1",
    headers_to_set=((wire.DECISION_ID_HEADER, "d1"), ("authorization", "Bearer tok"), ("x-api-key", "k")),
    headers_to_remove=("proxy-authorization", "x-agent-task"),
)


def test_an_allow_is_a_200_with_the_headers_to_set_the_removals_and_the_metadata() -> None:
    answer = _Answer(build_http_answer(ALLOW))
    assert answer.status == 200 and answer.body == b"" and answer.headers["content-length"] == "0"
    assert answer.headers["authorization"] == "Bearer tok" and answer.headers["x-api-key"] == "k"
    assert answer.headers[wire.DECISION_ID_HEADER] == "d1"
    assert answer.headers[wire.HEADERS_TO_REMOVE_HEADER] == "proxy-authorization,x-agent-task"
    metadata = {k: answer.headers[k] for k in wire.HTTP_METADATA_KEYS if k in answer.headers}
    assert metadata == {"decision_id": "d1", "decision": "allow", "reason": "allowed", "task_id": "t1"}


def test_the_remaining_budget_of_an_allow_and_the_fields_of_a_deny() -> None:
    allowed = _Answer(build_http_answer(Decision(True, Reason.ALLOWED, 200, "d1", remaining=3)))
    assert allowed.headers[wire.REMAINING_HEADER] == "3"
    assert wire.REMAINING_HEADER not in _Answer(build_http_answer(ALLOW)).headers
    spent = Decision(False, Reason.BUDGET_EXHAUSTED, 429, "d2", remaining=0)
    assert json.loads(_Answer(build_http_answer(spent)).body) == {
        "decision_id": "d2",
        "reason": "budget_exhausted",
        "remaining": 0,
    }
    waiting = Decision(False, Reason.APPROVAL_REQUIRED, 403, "d3", approval={"id": "a1", "status": "pending"})
    assert json.loads(_Answer(build_http_answer(waiting)).body)["approval_id"] == "a1"


def test_a_body_route_of_an_approval_host_sends_its_body_and_cap() -> None:
    parsed = _parse(method="POST", context={wire.CONTEXT_BODY_CAP: "4096"}, body=b"{}")
    assert parsed.body_cap == 4096 and parsed.body == b"{}"
    plain = _parse(method="POST", body=b"{}")
    assert plain.body_cap == 0 and plain.body is None
    assert _parse(method="POST", context={wire.CONTEXT_BODY_CAP: "-1"}, body=b"{}").body is None


@pytest.mark.parametrize("direction", ["control", "local"])
def test_a_route_never_asks_as_control_or_local(direction: str) -> None:
    with pytest.raises(BadRequestError, match="direction"):
        _parse(direction=direction)


def test_an_allowed_tools_list_carries_its_filter_as_a_json_array() -> None:
    decision = Decision(True, Reason.ALLOWED, 200, "d1", list_filter=("read_*", "wetter-ö"))
    answer = _Answer(build_http_answer(decision))
    assert json.loads(answer.headers[wire.METADATA_LIST_FILTER]) == ["read_*", "wetter-ö"]
    assert answer.headers[wire.METADATA_LIST_FILTER].isascii()
    assert answer.headers[wire.DECISION_ID_HEADER] == "d1"  # added when the decision has none


@pytest.mark.parametrize(("status", "sent"), [(403, 403), (429, 429), (421, 421), (200, 403), (503, 403), (0, 403)])
def test_a_deny_is_never_a_200_nor_a_5xx(status: int, sent: int) -> None:
    decision = Decision(False, Reason.PATH_NOT_ALLOWED, status, "d2", task_id="t1")
    answer = _Answer(build_http_answer(decision))
    assert answer.status == sent
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers[wire.REASON_HEADER] == "path_not_allowed" and answer.headers["decision"] == "deny"
    assert json.loads(answer.body) == {"decision_id": "d2", "reason": "path_not_allowed"}
    assert "authorization" not in answer.headers


def test_a_deny_on_an_mcp_route_is_a_json_rpc_error() -> None:
    decision = Decision(False, Reason.TOOL_NOT_ALLOWED, 403, "d3", method="POST", rpc_protocol="mcp", rpc_id=7)
    body = json.loads(_Answer(build_http_answer(decision)).body)
    assert body["jsonrpc"] == "2.0" and body["id"] == 7 and body["error"]["code"] == -32030


@pytest.mark.parametrize(
    "header",
    [
        ("x-api-key", "k\r\nx-envoy-auth-headers-to-remove: authorization"),
        ("x-api-key", "k\n"),
        ("bad name", "v"),
        ("x-api-key", "ключ"),
    ],
)
def test_a_header_that_would_break_the_answer_is_refused(header: tuple[str, str]) -> None:
    decision = Decision(True, Reason.ALLOWED, 200, "d4", headers_to_set=(header,))
    with pytest.raises(ValueError):
        build_http_answer(decision)


def test_the_service_answers_and_records_an_unsendable_allow_as_an_internal_error(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "decisions.log", stdout=False)

    def decide(request: AuthzRequest, decision_id: str) -> Decision:
        return Decision(True, Reason.ALLOWED, 200, decision_id, headers_to_set=(("x-api-key", "a\r\nb: c"),))

    service = AuthorizationService(decide, log)
    raw, wait = service.answer(_parse, build_http_answer)
    answer = _Answer(raw)
    assert wait is None and answer.status == 403 and answer.headers[wire.REASON_HEADER] == "internal_error"
    (record,) = [json.loads(line) for line in (tmp_path / "decisions.log").read_text().splitlines()]
    assert record["decision"] == "deny" and record["reason"] == "internal_error"
    log.close()
