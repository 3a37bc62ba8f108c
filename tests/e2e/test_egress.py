"""Egress through real Envoy: tokens, credentials, deny reasons, budgets, path agreement, records."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest

from sidecar.harness import http_get
from tests.support.config import AGENT, API_AUDIENCE, API_HOST, ISSUER, task
from tests.support.stack import Env, start_env

pytestmark = pytest.mark.e2e

BUDGET = 5
TASKS = [
    task(
        "report",
        on_behalf_of="user:jane@example.com",
        egress=[
            {
                "name": "api-read",
                "host": API_HOST,
                "methods": ["GET", "HEAD"],
                "paths": ["/v1/items/*", "/v1/health"],
                "audience": API_AUDIENCE,
                "scope": "items:read",
            },
            {
                "name": "budgeted",
                "host": "other.internal",
                "methods": ["POST"],
                "paths": ["/v1/spend"],
                "max_calls": BUDGET,
            },
        ],
    )
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    running = start_env(tmp_path_factory.mktemp("egress"), sock_dir, TASKS)
    yield running
    running.stack.stop()
    running.upstream.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def _received_for(env: Env, decision_id: str | None) -> list:
    return [r for r in env.upstream.requests() if r.headers.get("x-agent-authz-decision-id") == decision_id]


def test_allowed_call_carries_a_token_that_verifies_against_the_jwks(env: Env) -> None:
    reply = env.send("GET", f"http://{API_HOST}/v1/items/7?expand=1")
    assert reply.status == 200, reply.body
    (received,) = _received_for(env, reply.decision_id)
    assert received.error is None and received.raw_path == "/v1/items/7?expand=1"
    token = received.headers["authorization"].removeprefix("Bearer ")
    status, body = http_get(env.stack.sidecar.admin_url + "/.well-known/jwks.json")
    assert status == 200
    key = jwt.PyJWKSet.from_dict(json.loads(body))[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=API_AUDIENCE, issuer=ISSUER)
    assert claims["sub"] == "user:jane@example.com"
    assert claims["act"] == {"sub": AGENT}
    assert claims["txn"] == "report" and claims["scope"] == "items:read"
    assert claims["exp"] - claims["iat"] <= 300
    record = env.record(reply.decision_id)
    assert record["token"]["jti"] == claims["jti"] and record["token"]["aud"] == API_AUDIENCE


def test_agent_authorization_is_replaced_not_appended(env: Env) -> None:
    reply = env.send("GET", f"http://{API_HOST}/v1/items/1", {"Authorization": "Bearer agent-own-token"})
    assert reply.status == 200
    (received,) = _received_for(env, reply.decision_id)
    auth = received.headers["authorization"]
    assert "agent-own-token" not in auth and "," not in auth
    assert received.claims is not None and received.claims["txn"] == "report"


def test_task_header_and_proxy_authorization_are_stripped(env: Env) -> None:
    reply = env.send(
        "GET",
        f"http://{API_HOST}/v1/items/1",
        {"x-agent-task": "report", "Proxy-Authorization": "Basic c2VjcmV0", "x-agent-authz-decision-id": "forged"},
    )
    assert reply.status == 200
    (received,) = _received_for(env, reply.decision_id)
    assert "x-agent-task" not in received.headers
    assert "proxy-authorization" not in received.headers
    assert received.headers["x-agent-authz-decision-id"] == reply.decision_id != "forged"


@pytest.mark.parametrize(
    ("method", "url", "headers", "status", "reason"),
    [
        ("GET", "http://evil.example.net/v1/items/1", {}, 403, "host_not_allowed"),
        ("GET", f"http://{API_HOST}:8080/v1/items/1", {}, 403, "port_not_allowed"),
        ("DELETE", f"http://{API_HOST}/v1/items/1", {}, 403, "method_not_allowed"),
        ("GET", f"http://{API_HOST}/v1/admin", {}, 403, "path_not_allowed"),
        ("GET", f"http://{API_HOST}/v1/items/../admin", {}, 403, "path_not_allowed"),
        ("GET", f"http://{API_HOST}/v1/items/%2e%2e/admin", {}, 403, "path_not_allowed"),
        ("GET", f"http://{API_HOST}/v1/items/x;jsessionid=1", {}, 400, "bad_request"),
        ("GET", f"http://{API_HOST}/v1/items/%ff", {}, 400, "bad_request"),
        ("GET", f"http://{API_HOST}/v1/items/1", {"x-agent-task": "someone-elses"}, 403, "unknown_task"),
    ],
)
def test_deny_reasons(env: Env, method: str, url: str, headers: dict[str, str], status: int, reason: str) -> None:
    before = len(env.upstream.requests())
    reply = env.send(method, url, headers)
    assert reply.status == status
    assert reply.reason == reason
    assert reply.json() == {"decision_id": reply.decision_id, "reason": reason}
    assert env.record(reply.decision_id)["reason"] == reason
    assert len(env.upstream.requests()) == before


def test_envoy_rejects_what_it_cannot_normalize(env: Env) -> None:
    before = len(env.upstream.requests())
    for path in ("/v1/items/a%2Fb", "/v1/items/a%5Cb", "/v1/items/x#frag"):
        assert env.send("GET", f"http://{API_HOST}{path}").status == 400
    assert len(env.upstream.requests()) == before


def test_budget_is_exact_under_concurrent_requests(env: Env) -> None:
    def call(_: int) -> int:
        return env.send("POST", "http://other.internal/v1/spend", body=b"{}").status

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(call, range(40)))
    assert statuses.count(200) == BUDGET
    assert statuses.count(429) == 40 - BUDGET
    spent = [r for r in env.upstream.requests() if r.host == "other.internal"]
    assert len(spent) == BUDGET


HOSTILE_PATHS = [
    "/v1/items/a/../b",
    "/v1/items/./c",
    "/v1/items//d",
    "/v1/items/%41%42",
    "/v1/items/caf%C3%A9",
    "/v1/items/a%20b",
    "/v1/ite%6Ds/e",
    "/v1/items/a\\b",
    "/v1/items/x/..",
    "/v1/items/%2e/f",
    "/v1/items/.%2E/items/g",
    "/v1/items/h?next=../../admin&x=%2F",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_upstream_receives_the_path_that_was_authorized(env: Env, path: str) -> None:
    reply = env.send("GET", f"http://{API_HOST}{path}")
    record = env.record(reply.decision_id)
    if reply.status != 200:
        assert record["decision"] == "deny"
        return
    (received,) = _received_for(env, reply.decision_id)
    received_path = urllib.parse.unquote(received.raw_path.split("?", 1)[0])
    assert received_path == record["path"], (path, received.raw_path, record["path"])
    assert record["path"].startswith("/v1/items/")


def test_records_are_complete_and_hold_no_secrets(env: Env) -> None:
    replies = [env.send("GET", f"http://{API_HOST}/v1/items/{i}") for i in range(3)]
    replies.append(env.send("GET", f"http://{API_HOST}/v1/nope"))
    text = (env.state / "decisions.log").read_text()
    assert "eyJ" not in text and "Bearer" not in text
    for reply in replies:
        record = env.record(reply.decision_id)
        for field in (
            "time",
            "decision_id",
            "request_id",
            "direction",
            "agent",
            "task_id",
            "on_behalf_of",
            "method",
            "host",
            "path",
            "rule",
            "decision",
            "reason",
            "latency_us",
        ):
            assert field in record
        assert record["agent"] == AGENT and record["direction"] == "egress"
        assert record["request_id"]
        assert "?" not in record["path"]


def test_decision_id_reaches_envoy_access_log(env: Env) -> None:
    reply = env.send("GET", f"http://{API_HOST}/v1/items/access-log")
    from sidecar.harness import wait_until

    def logged() -> dict | None:
        for line in env.stack.envoy.stdout_path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("decision_id") == reply.decision_id:
                return entry
        return None

    entry = wait_until(logged, timeout=10, what="access log line")
    assert entry["reason"] == "allowed" and entry["status"] == 200


@pytest.mark.parametrize(
    "host", [f"{API_HOST}.", API_HOST.upper() + ".", f"{API_HOST}.:80", "Api.Internal:80", f"{API_HOST}:080"]
)
def test_every_spelling_of_a_pinned_host_reaches_its_pinned_address(env: Env, host: str) -> None:
    """Judged as api.internal and routed to envoy.destinations[api.internal] (there is no DNS for it here:
    any other route would be a 503)."""
    reply = env.send("GET", f"http://{host}/v1/items/spelled", headers={"Host": host})
    assert reply.status == 200, (host, reply.body)
    (received,) = _received_for(env, reply.decision_id)
    assert received.headers["authorization"].startswith("Bearer ")
    record = env.record(reply.decision_id)
    assert (record["host"], record["port"], record["decision"]) == (API_HOST, 80, "allow")


def test_reserved_headers_the_agent_forges_never_leave(env: Env) -> None:
    forged = {"x-agent-authz-caller": "spiffe://test.example/ns/admin/sa/root", "X-Agent-Authz-Reason": "allowed"}
    reply = env.send("GET", f"http://{API_HOST}/v1/items/forged", headers=forged)
    assert reply.status == 200
    (received,) = _received_for(env, reply.decision_id)
    assert not {"x-agent-authz-caller", "x-agent-authz-reason"} & set(received.headers)


def test_no_allow_is_recorded_that_envoy_cannot_deliver(env: Env) -> None:
    """Headers just under Envoy's 60 KiB (with the token) are delivered; one byte more is a 431 with a deny
    record - never an allow record with Envoy's 500."""

    def call(size: int) -> tuple[int, str | None]:
        # in headers of 4000 bytes at most (the sample upstream refuses a header line over 8 KiB)
        chunks = [4000] * (size // 4000) + ([size % 4000] if size % 4000 else [])
        filler = {f"x-filler-{i:02}": "f" * n for i, n in enumerate(chunks)}
        reply = env.send("GET", f"http://{API_HOST}/v1/items/big", headers=filler)
        record = env.record(reply.decision_id)
        assert reply.status != 500 and record["decision"] == ("allow" if reply.status == 200 else "deny"), reply
        return reply.status, reply.reason

    low, high = 50_000, 61_000  # allowed, denied
    assert call(low)[0] == 200 and call(high) == (431, "headers_too_large")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if call(middle)[0] == 200 else (low, middle)
    for size in (low - 1, low, high, high + 1):
        assert call(size)[0] == (200 if size <= low else 431)


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        (f"{API_HOST}:443", "tls_not_allowed"),
        ("elsewhere.example.com:443", "host_not_allowed"),
        (f"{API_HOST}:80", "tls_not_allowed"),
    ],
)
def test_a_connect_is_a_decision_with_a_record(env: Env, authority: str, reason: str) -> None:
    """Without tls: intercept rules no tunnel is ever allowed - and each refusal has a reason and a record."""
    import socket

    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 403"), head
    headers = dict(line.lower().split(": ", 1) for line in head.split("\r\n\r\n")[0].split("\r\n")[1:])
    assert headers["x-agent-authz-reason"] == reason
    record = env.record(headers["x-agent-authz-decision-id"])
    host, _, port = authority.rpartition(":")
    assert (record["method"], record["host"], record["port"], record["reason"]) == ("CONNECT", host, int(port), reason)


@pytest.mark.parametrize(
    ("raw", "status", "detail"),
    [
        (b"GET /v1/items/1?secret=QS HTTP/1.1\r\nHost: api.internal\r\nbad header\r\n\r\n", 400, "codec_error"),
        (b"GET /v1/items/1 HTTP/1.1\r\nHost: api.internal\r\nx-big: " + b"b" * 70_000 + b"\r\n\r\n", 431, ""),
        (b"\x16\x03\x01\x00\x05junk\r\n\r\n", 400, "codec_error"),
    ],
)
def test_what_envoy_refuses_without_asking_is_recorded(env: Env, raw: bytes, status: int, detail: str) -> None:
    """A request Envoy cannot parse never reaches ext_authz: its access log entry does, as a record."""
    import socket

    before = {r["decision_id"] for r in env.records()}
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = sock.recv(200)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer

    def refused() -> dict[str, object] | None:
        new = [r for r in env.records() if r["decision_id"] not in before and r["reason"] == "refused_by_proxy"]
        return new[0] if new else None

    from sidecar.harness import wait_until

    record = wait_until(refused, timeout=10, what="the refusal's record")
    assert (record["decision"], record["status"], record["direction"]) == ("deny", status, "egress")
    assert detail in str(record["detail"]) and "QS" not in json.dumps(record)
