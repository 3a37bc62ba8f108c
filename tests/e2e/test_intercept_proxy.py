"""HTTPS interception through the proxy path (``HTTPS_PROXY``, ``CONNECT host:443``), with real Envoy.

No root needed: the agent is ``curl`` or Python ``httpx`` with only the injected environment
(``HTTPS_PROXY`` and the trust variables of :func:`sidecar.tls_intercept.trust.agent_trust_env` - no
``-k``, no ``--cacert``). Upstreams are the sample upstream serving HTTPS with their own test CA,
which Envoy trusts through ``envoy.upstream_ca``. The transparent (iptables) path is tested in
``test_intercept_netns.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.demo.upstream import SampleUpstream, TokenCheck
from sidecar.harness import AuthzStack, http_get, wait_until
from sidecar.identity.devca import DevCA
from sidecar.tls_intercept.trust import agent_trust_env
from tests.support.certs import make_leaf, write_pair
from tests.support.config import ISSUER, base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e

API = "api.secure.test"
WRONG = "wrong-name.secure.test"
UNTRUSTED = "untrusted.secure.test"
PASS = "pass.secure.test"
LATER = "later.secure.test"
KEY = "sk-live-" + "7f3a9c" * 6
AGENT_SCRIPT = """
import json, os, sys, httpx
out = []
with httpx.Client(timeout=10) as client:   # trust_env: HTTPS_PROXY and SSL_CERT_FILE from the environment
    for method, url in json.loads(sys.argv[1]):
        try:
            r = client.request(method, url)
            out.append({"status": r.status_code, "headers": dict(r.headers), "body": r.text, "http": r.http_version})
        except httpx.HTTPError as exc:
            out.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(out))
"""


@dataclass
class Stack:
    state: Path
    stack: AuthzStack
    upstream: SampleUpstream
    other: SampleUpstream
    config: dict[str, Any]
    env: dict[str, str]

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, env=self.env, check=False)

    def httpx(self, *calls: tuple[str, str]) -> list[dict[str, Any]]:
        argv = [sys.executable, "-c", AGENT_SCRIPT, json.dumps(calls)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=self.env, check=False)
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def records(self) -> list[dict[str, Any]]:
        path = self.state / "decisions.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def record(self, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            found = [r for r in self.records() if all(r.get(k) == v for k, v in match.items())]
            return found[-1] if found else None

        return wait_until(find, timeout=10, what=f"record {match}")

    def access_log(self, decision_id: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for line in self.stack.envoy.stdout_path.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("decision_id") == decision_id:
                    return dict(json.loads(line))
            return None

        return wait_until(find, timeout=10, what=f"Envoy access log line for {decision_id}")

    def rewrite(self, tasks: list[dict[str, Any]]) -> None:
        self.config = {**self.config, "tasks": tasks}
        write_config(self.state, self.config)

    def chains(self) -> set[str]:
        status, body = self.stack.envoy.admin("/config_dump?resource=dynamic_listeners")
        assert status == 200
        names = set()
        for item in json.loads(body)["configs"]:
            listener = item.get("active_state", {}).get("listener", {})
            names |= {c.get("name", "") for c in listener.get("filter_chains", [])}
        return names


def _server_context(directory: Path, name: str, ca: DevCA, dns: list[str]) -> ssl.SSLContext:
    cert, key = write_pair(directory, name, *make_leaf(ca, [], dns=dns))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _tasks(port: int, other_port: int) -> list[dict[str, Any]]:
    rule = {"tls": "intercept", "methods": ["GET"], "paths": ["/v1/*"]}
    return [
        task(
            "secure",
            egress=[
                {
                    **rule,
                    "name": "api",
                    "host": API,
                    "upstream_port": port,
                    "scope": "items:read",
                    "credential": "api-key",
                },
                {**rule, "name": "wrong", "host": WRONG, "upstream_port": port},
                {**rule, "name": "untrusted", "host": UNTRUSTED, "upstream_port": other_port},
                {"name": "pass", "host": PASS, "tls": "passthrough"},
            ],
        )
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("intercept")
    sock_dir = Path(os.path.realpath("/tmp")) / f"aa-i-{os.getpid()}"
    sock_dir.mkdir(exist_ok=True)
    write_keys(state)
    upstream_ca = DevCA.create("upstream.test")
    upstream_ca.save(state / "upstream-ca")
    other_ca = DevCA.create("other.test")  # nobody trusts this one
    (state / "secrets").mkdir()
    (state / "secrets" / "api.key").write_text(KEY + "\n")
    upstream = SampleUpstream(
        {API: TokenCheck(f"https://{API}", ISSUER)},
        ssl_context=_server_context(state / "up", "good", upstream_ca, [API, LATER]),
    )
    other = SampleUpstream({}, ssl_context=_server_context(state / "up", "other", other_ca, [UNTRUSTED]))
    port, other_port = upstream.start(), other.start()
    destinations = {h: f"127.0.0.1:{port}" for h in (API, WRONG, LATER)} | {UNTRUSTED: f"127.0.0.1:{other_port}"}
    config = base_config(sock_dir, _tasks(port, other_port), destinations)
    config["credentials"] = {"api-key": {"header": "x-api-key", "file": "secrets/api.key"}}
    config["envoy"]["upstream_ca"] = "upstream-ca/bundle.pem"
    config["intercept"] = {"state_dir": "intercept", "publish_dir": "trust", "leaf_ttl": "4s"}
    config_path = write_config(state, config)
    sidecar_stack = AuthzStack(config_path, state)
    try:
        sidecar_stack.start()
        upstream.jwks_url = sidecar_stack.sidecar.admin_url + "/.well-known/jwks.json"
        env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": f"http://127.0.0.1:{sidecar_stack.egress_port}"}
        env |= agent_trust_env(state / "trust")
        yield Stack(state, sidecar_stack, upstream, other, config, env)
    finally:
        sidecar_stack.stop()
        upstream.stop()
        other.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _headers(curl_stdout: str) -> tuple[int | None, dict[str, str]]:
    """Status and headers of the last response ``curl -D -`` printed (after ``200 Connection established``)."""
    blocks = [b for b in curl_stdout.replace("\r\n", "\n").split("\n\n") if b.startswith("HTTP/")]
    if not blocks:
        return None, {}
    first, *rest = blocks[-1].splitlines()
    return int(first.split()[1]), {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}


def test_allowed_call_gets_token_and_key_and_the_agent_sees_neither(stack: Stack) -> None:
    result = stack.curl(f"https://{API}/v1/items/1")
    status, headers = _headers(result.stdout)
    assert result.returncode == 0 and status == 200, result.stderr + result.stdout
    (received,) = [r for r in stack.upstream.requests() if r.raw_path == "/v1/items/1"]
    assert received.scheme == "https" and received.error is None
    assert received.claims is not None and received.claims["scope"] == "items:read"
    assert received.claims["aud"] == f"https://{API}"
    assert received.headers["x-api-key"] == KEY
    record = stack.record(decision_id=headers["x-agent-authz-decision-id"])
    assert (record["decision"], record["tls"], record["sni"], record["rule"]) == ("allow", "intercept", API, "api")
    assert record["upstream_verify"] == f"dns:{API} ca:{stack.state / 'upstream-ca' / 'bundle.pem'}"
    assert record["connect"] == f"{API}:443"  # the tunnel's authority, from the CONNECT's own decision
    tunnel = stack.record(method="CONNECT", host=API)
    assert (tunnel["decision"], tunnel["port"], tunnel["rule"], tunnel["task_id"]) == ("allow", 443, "api", "secure")
    assert record["token"]["aud"] == f"https://{API}"
    assert KEY not in result.stdout and "eyJ" not in result.stdout  # the agent saw neither key nor token
    assert KEY not in json.dumps(stack.env)
    # httpx, also with only the environment: the same obligations upstream
    (reply,) = stack.httpx(("GET", f"https://{API}/v1/items/2"))
    assert reply["status"] == 200, reply
    (received,) = [r for r in stack.upstream.requests() if r.raw_path == "/v1/items/2"]
    assert received.headers["x-api-key"] == KEY and received.claims is not None
    assert KEY not in json.dumps(reply)


def test_disallowed_path_and_method_get_403_inside_tls(stack: Stack) -> None:
    before = len(stack.upstream.requests())
    denied, method = stack.httpx(("GET", f"https://{API}/admin"), ("DELETE", f"https://{API}/v1/items/1"))
    assert (denied["status"], denied["headers"]["x-agent-authz-reason"]) == (403, "path_not_allowed")
    assert (method["status"], method["headers"]["x-agent-authz-reason"]) == (403, "method_not_allowed")
    assert len(stack.upstream.requests()) == before
    record = stack.record(decision_id=denied["headers"]["x-agent-authz-decision-id"])
    assert (record["tls"], record["sni"], record["path"]) == ("intercept", API, "/admin")


def test_a_request_for_another_host_inside_the_connection_is_misdirected(stack: Stack) -> None:
    result = stack.curl("-H", f"Host: {LATER}", f"https://{API}/v1/items/3")
    status, headers = _headers(result.stdout)
    assert (status, headers.get("x-agent-authz-reason")) == (421, "misdirected_request"), result.stdout
    record = stack.record(decision_id=headers["x-agent-authz-decision-id"])
    assert (record["host"], record["sni"], record["decision"]) == (LATER, API, "deny")
    assert not [r for r in stack.upstream.requests() if r.raw_path == "/v1/items/3"]


@pytest.mark.parametrize(("host", "failure"), [(WRONG, "SAN"), (UNTRUSTED, "CERTIFICATE_VERIFY_FAILED")])
def test_upstream_with_a_bad_certificate_gives_502_and_a_logged_decision(stack: Stack, host: str, failure: str) -> None:
    before = len(stack.upstream.requests()) + len(stack.other.requests())
    (reply,) = stack.httpx(("GET", f"https://{host}/v1/x"))
    assert reply["status"] == 502, reply
    body = json.loads(reply["body"])
    assert body["reason"] == "upstream_failed" and failure in body["detail"]
    record = stack.record(decision_id=body["decision_id"])
    assert (record["decision"], record["tls"], record["sni"]) == ("allow", "intercept", host)
    line = stack.access_log(body["decision_id"])
    assert line["status"] == 502 and "UF" in line["flags"] and failure in line["upstream_tls_failure"]
    assert len(stack.upstream.requests()) + len(stack.other.requests()) == before  # never a request upstream


def test_connect_to_a_host_that_is_not_intercepted_is_refused_and_logged(stack: Stack) -> None:
    """The CONNECT itself is decided: 403 with a reason and a record, no tunnel."""
    for host, port, reason in (
        (PASS, 443, "tls_not_allowed"),  # passthrough is for the transparent listener
        ("elsewhere.example.com", 443, "host_not_allowed"),
        (API, 8443, "port_not_allowed"),  # tunnels end in the chains of port 443
    ):
        result = stack.curl(f"https://{host}:{port}/")
        assert result.returncode != 0, result.stdout
        status, headers = _headers(result.stdout)
        assert (status, headers.get("x-agent-authz-reason")) == (403, reason), result.stdout
        record = stack.record(decision_id=headers["x-agent-authz-decision-id"])
        assert (record["method"], record["host"], record["port"], record["decision"]) == ("CONNECT", host, port, "deny")
    assert not [r for r in stack.records() if r["sni"] in (PASS, "elsewhere.example.com")]  # nothing went through


TUNNEL = r"""
import json, os, socket, ssl, sys
proxy_port, connect_to, sni = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
sock.sendall(f"CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n".encode())
assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "CONNECT refused"
tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]).wrap_socket(sock, server_hostname=sni)
tls.sendall(f"GET /v1/tunnel HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
data = b""
while chunk := tls.recv(4096):
    data += chunk
head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
print(json.dumps({"status": int(head[0].split()[1]), "headers": dict(h.lower().split(": ", 1) for h in head[1:])}))
"""


def test_a_tunnel_carries_only_the_name_it_was_opened_for(stack: Stack) -> None:
    """CONNECT api:443 (allowed), then TLS for another intercepted name inside: misdirected (421), both names
    recorded, nothing upstream - no domain fronting through the tunnel."""
    argv = [sys.executable, "-c", TUNNEL, str(stack.stack.egress_port), f"{API}:443", WRONG]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=stack.env, check=False)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert (reply["status"], reply["headers"]["x-agent-authz-reason"]) == (421, "misdirected_request")
    record = stack.record(decision_id=reply["headers"]["x-agent-authz-decision-id"])
    assert (record["connect"], record["sni"], record["decision"]) == (f"{API}:443", WRONG, "deny")
    assert not [r for r in stack.upstream.requests() if r.raw_path == "/v1/tunnel"]


def test_ca_is_published_and_its_key_stays_private(stack: Stack) -> None:
    status, body = http_get(stack.stack.sidecar.admin_url + "/ca.pem")
    assert status == 200
    ca = x509.load_pem_x509_certificate(body)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    trust = stack.state / "trust"
    assert (trust / "ca.pem").read_bytes() == body
    assert (trust / "ca-bundle.pem").read_bytes().endswith(body)
    assert b"PRIVATE KEY" not in (trust / "ca.pem").read_bytes() + (trust / "ca-bundle.pem").read_bytes()
    private = stack.state / "intercept"
    assert (private.stat().st_mode & 0o777) == 0o700
    key_files = [p for p in private.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert key_files and all(p.stat().st_mode & 0o077 == 0 for p in key_files)


def test_tasks_added_and_revoked_add_and_remove_chains_without_restart(stack: Stack) -> None:
    envoy_pid = stack.stack.envoy.proc.pid if stack.stack.envoy.proc else None
    assert f"intercept|{LATER}:443" not in stack.chains()
    port = stack.upstream.port
    later = task(
        "later", egress=[{"host": LATER, "tls": "intercept", "upstream_port": port, "methods": ["GET"], "paths": ["*"]}]
    )
    base = _tasks(port, stack.other.port)
    stack.rewrite([*base, later])
    wait_until(lambda: f"intercept|{LATER}:443" in stack.chains(), timeout=10, what="the new chain")
    reply = stack.curl(f"https://{LATER}/hello")
    assert _headers(reply.stdout)[0] == 200, reply.stderr
    stack.rewrite([*base, {**later, "revoked": True}])
    wait_until(lambda: f"intercept|{LATER}:443" not in stack.chains(), timeout=10, what="the chain removed")
    refused = stack.curl(f"https://{LATER}/hello")
    assert refused.returncode != 0
    tunnel = stack.record(method="CONNECT", host=LATER, decision="deny")  # the tunnel itself is refused now
    assert (tunnel["reason"], tunnel["task_id"]) == ("task_revoked", "later")
    status, ready = http_get(stack.stack.sidecar.admin_url + "/readyz")
    assert status == 200 and LATER not in json.loads(ready)["intercept"]["leaves"]  # its leaf is gone too
    stack.rewrite(base)
    assert stack.stack.envoy.proc is not None and stack.stack.envoy.proc.pid == envoy_pid


ROTATION_SCRIPT = """
import http.client, json, os, ssl, sys, time
proxy = os.environ["HTTPS_PROXY"].removeprefix("http://")
host, port = proxy.rsplit(":", 1)
context = ssl.create_default_context()            # SSL_CERT_FILE: the pod bundle
deadline, failures, serials, done = time.monotonic() + float(sys.argv[2]), [], set(), 0
keep = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
keep.set_tunnel(sys.argv[1], 443)
while time.monotonic() < deadline:
    for conn in (keep, None):                     # one long-lived connection, one new per round
        fresh = conn is None
        if fresh:
            conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
            conn.set_tunnel(sys.argv[1], 443)
        try:
            conn.request("GET", "/v1/items/rot")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
            serials.add(conn.sock.getpeercert()["serialNumber"])
            done += 1
        except Exception as exc:
            failures.append(repr(exc))
        if fresh:
            conn.close()
print(json.dumps({"done": done, "failures": failures, "serials": sorted(serials)}))
"""


def test_leaf_rotation_and_listener_changes_drop_no_request(stack: Stack) -> None:
    """leaf_ttl 4 s, re-minted with a third of its life left: an 8 s stream sees several leaves. Meanwhile
    a task with a 3 s ttl adds a filter chain (LDS) that its expiry removes again, with no config change."""
    argv = [sys.executable, "-c", ROTATION_SCRIPT, API, "8"]
    stream = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env)
    try:
        wait_until(
            lambda: any(r.raw_path == "/v1/items/rot" for r in stack.upstream.requests()), timeout=10, what="stream"
        )
        rule = {"host": LATER, "tls": "intercept", "upstream_port": stack.upstream.port, "methods": ["GET"]}
        base = _tasks(stack.upstream.port, stack.other.port)
        stack.rewrite([*base, task("short", ttl="3s", egress=[{**rule, "paths": ["*"]}])])
        wait_until(lambda: f"intercept|{LATER}:443" in stack.chains(), timeout=5, what="the chain of the new task")
        wait_until(lambda: f"intercept|{LATER}:443" not in stack.chains(), timeout=10, what="the chain gone at expiry")
        out, err = stream.communicate(timeout=40)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.communicate()
    assert stream.returncode == 0, err
    outcome = json.loads(out)
    assert outcome["failures"] == [] and outcome["done"] > 20, outcome
    assert len(outcome["serials"]) >= 2, outcome  # new handshakes got new leaves
    stack.rewrite(_tasks(stack.upstream.port, stack.other.port))
