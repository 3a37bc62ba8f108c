"""HTTP checks (``envoy.authz_transport: http``, the default) through real Envoy, as the agent attacks them.

* The names Envoy uses to tell the sidecar about a request (``x-agent-authz-context``, ``-scheme``,
  ``-destination``, ``-peer-certificate``) are request headers the agent can send too: whatever it
  sends, the decision is the one for the request Envoy saw, and the record says what Envoy saw.
* Envoy in front of an HTTP service that misbehaves - garbage, a 5xx, an answer cut short or
  without framing, a connection closed at once, no answer - fails closed: 503 (or the 4xx it was
  given), and the upstream never sees the request. (Only ``200`` allows; the sidecar's own
  answers never carry a header that could break their framing: ``tests/unit/envoy_authz``.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.bootstrap.render import write_envoy
from sidecar.config.loader import load_config
from sidecar.demo.upstream import SampleUpstream
from sidecar.harness import EnvoyProcess, wait_until
from tests.support.config import API_HOST, base_config, task, write_config, write_keys
from tests.support.stack import Env, send, start_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    running = start_env(tmp_path_factory.mktemp("http-checks"), sock_dir, [task()])
    yield running
    running.stack.stop()
    running.upstream.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


FORGED_CONTEXTS = [
    '{"direction":"ingress"}',
    '{"direction":"egress","intercept":"api.internal:80","upstream_verify":"dns:x ca:/y"}',
    '{"direction":"egress","rpc_protocol":"mcp","rpc_body_cap":"4096"}',
    '{"direction":"egress","upstream_tls":"originate"}',
    "not even json",
]
FORGED = {
    "x-agent-authz-scheme": "https",
    "x-agent-authz-destination": "10.9.9.9:443",
    "x-agent-authz-peer-certificate": "-----BEGIN%20CERTIFICATE-----%0Aforged",
    "decision_id": "forged-id",
    "reason": "allowed",
}


def _access_log(env: Env, decision_id: str | None) -> dict[str, Any]:
    def logged() -> dict[str, Any] | None:
        for line in env.stack.envoy.stdout_path.read_text().splitlines():
            entry: dict[str, Any] = json.loads(line)
            if entry.get("decision_id") == decision_id:
                return entry
        return None

    return wait_until(logged, timeout=10, what="access log line")


@pytest.mark.parametrize("context", FORGED_CONTEXTS)
def test_the_agents_own_context_headers_change_nothing(env: Env, context: str) -> None:
    headers = {"x-agent-authz-context": context, **FORGED}
    allowed = env.send("GET", f"http://{API_HOST}/v1/items/1", headers)
    assert allowed.status == 200, allowed.body
    record = env.record(allowed.decision_id)
    assert (record["direction"], record["reason"], record["port"]) == ("egress", "allowed", 80)
    assert record["destination"].startswith("127.0.0.1:") and "tls" not in record and "mcp" not in record
    assert record["token"]["aud"] == "https://api.internal"  # the rule's audience, minted as for any call
    denied = env.send("GET", f"http://{API_HOST}/v1/other", headers)
    assert (denied.status, denied.reason) == (403, "path_not_allowed")
    assert denied.json() == {"decision_id": denied.decision_id, "reason": "path_not_allowed"}  # not JSON-RPC
    entry = _access_log(env, denied.decision_id)  # the dynamic metadata is the sidecar's, not the agent's
    assert entry["reason"] == "path_not_allowed" and entry["status"] == 403


def test_the_headers_envoy_adds_are_what_the_sidecar_reads(env: Env) -> None:
    reply = env.send("GET", f"http://{API_HOST}/v1/items/2")
    record = env.record(reply.decision_id)
    port = env.stack.egress_port
    assert record["destination"] == f"127.0.0.1:{port}"  # %DOWNSTREAM_LOCAL_ADDRESS%
    received = env.upstream.requests()[-1]
    assert received.headers["x-agent-authz-decision-id"] == reply.decision_id
    for name in ("decision_id", "decision", "task_id", "content-length", "x-envoy-auth-headers-to-remove"):
        assert name not in {k.lower() for k in received.headers}, name  # the answer's own headers stay in Envoy


def test_a_credential_header_is_set_and_the_agents_credentials_are_removed(env: Env) -> None:
    reply = env.send(
        "GET",
        f"http://{API_HOST}/v1/items/3",
        {"authorization": "Bearer agent-held", "proxy-authorization": "Basic x", "x-agent-task": "t1"},
    )
    assert reply.status == 200
    received = env.upstream.requests()[-1].headers
    assert received["authorization"].startswith("Bearer ey") and "agent-held" not in received["authorization"]
    assert "proxy-authorization" not in received and "x-agent-task" not in received


# -- Envoy in front of a misbehaving HTTP service --------------------------------------------------
def _answer_with(reply: Callable[[socket.socket, bytes], None]) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        reply(conn, data)

    return handle


BROKEN: dict[str, tuple[Callable[[socket.socket, bytes], None], int]] = {
    "garbage": (lambda c, _: c.sendall(b"\x00\xffnot http at all\r\n\r\n"), 503),
    "a 5xx": (lambda c, _: c.sendall(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n"), 503),
    "a 502 with a body": (lambda c, _: c.sendall(b"HTTP/1.1 502 Bad\r\ncontent-length: 2\r\n\r\nno"), 503),
    "cut mid-answer": (lambda c, _: c.sendall(b"HTTP/1.1 200 OK\r\ncontent-len"), 503),
    "closed at once": (lambda c, _: None, 503),
    "no answer": (lambda c, _: time.sleep(2), 503),
    "an answer without framing": (lambda c, _: c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: bogus\r\n\r\n"), 503),
    "a 4xx of its own": (lambda c, _: c.sendall(b"HTTP/1.1 418 Teapot\r\ncontent-length: 0\r\n\r\n"), 418),
}


class _FakeService:
    """A Unix-socket server standing in for the sidecar's HTTP service: ``handle(conn)`` per connection."""

    def __init__(self, path: Path, handle: Callable[[socket.socket], None]) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(handle,), daemon=True)
        self.thread.start()

    def _serve(self, handle: Callable[[socket.socket], None]) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                handle(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def _envoy_alone(tmp_path: Path, short_dir: Path, upstream_port: int) -> EnvoyProcess:
    """Envoy with the bootstrap the sidecar's config renders (no sidecar behind it)."""
    write_keys(tmp_path)
    config = write_config(tmp_path, base_config(short_dir, [task()], {API_HOST: f"127.0.0.1:{upstream_port}"}))
    bootstrap = tmp_path / "envoy.json"
    write_envoy(load_config(config), bootstrap)
    envoy = EnvoyProcess(bootstrap, log_dir=tmp_path)
    envoy.start()
    envoy.wait_ready(30)
    return envoy


def test_the_check_never_carries_the_agents_x_agent_authz_headers(tmp_path: Path, short_dir: Path) -> None:
    seen: list[bytes] = []

    def record(conn: socket.socket, data: bytes) -> None:
        seen.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    upstream = SampleUpstream({})
    fake = _FakeService(short_dir / "authz-http.sock", _answer_with(record))
    envoy = None
    try:
        envoy = _envoy_alone(tmp_path, short_dir, upstream.start())
        forged = {
            "x-agent-authz-context": '{"direction":"ingress","forged":"1"}',
            "x-agent-authz-peer-certificate": "forged-certificate",
            "x-agent-authz-scheme": "forged-scheme",
            "x-agent-authz-destination": "forged:1",
            "X-Agent-Authz-Anything": "forged",
        }
        reply = send(envoy.listener_port("egress_http"), "GET", f"http://{API_HOST}/v1/items/1", forged)
        assert reply.status == 200
        (check,) = seen
        head = check.decode("latin-1").split("\r\n")
        assert head[0] == "GET /agent-authz/check/v1/items/1 HTTP/1.1"
        fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        assert "forged" not in check.decode("latin-1")
        assert json.loads(fields["x-agent-authz-context"]) == {"direction": "egress"}
        assert fields["x-agent-authz-scheme"] == "http"
        assert "x-agent-authz-peer-certificate" not in fields  # no client certificate: no header at all
    finally:
        if envoy is not None:
            envoy.stop()
        fake.close()
        upstream.stop()


@pytest.mark.parametrize("case", list(BROKEN))
def test_envoy_fails_closed_in_front_of_a_broken_http_service(tmp_path: Path, short_dir: Path, case: str) -> None:
    reply_with, expected = BROKEN[case]
    upstream = SampleUpstream({})
    fake = _FakeService(short_dir / "authz-http.sock", _answer_with(reply_with))
    envoy = None
    try:
        envoy = _envoy_alone(tmp_path, short_dir, upstream.start())
        reply = send(envoy.listener_port("egress_http"), "GET", f"http://{API_HOST}/v1/items/1")
        assert reply.status == expected, (case, reply)
        assert upstream.requests() == []  # nothing went through
        assert envoy.alive()
    finally:
        if envoy is not None:
            envoy.stop()
        fake.close()
        upstream.stop()
