"""Ingress through real Envoy mTLS: SPIFFE validation in Envoy, re-verification in the sidecar."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.demo.tls_client import mtls_request
from sidecar.demo.upstream import SampleUpstream
from sidecar.harness import http_get, wait_until
from sidecar.identity.devca import DevCA
from tests.support.certs import key_usage, make_leaf, write_pair
from tests.support.config import AGENT, PLANNER, add_file_identity, task
from tests.support.stack import Env, start_env

pytestmark = pytest.mark.e2e

GATEWAY = "spiffe://test.example/ns/edge/sa/gateway"
RULES = [
    {
        "name": "planner",
        "callers": [{"id": PLANNER}, {"trust_domain": "partner.example", "path_prefix": "/reports"}],
        "methods": ["GET"],
        "paths": ["/v1/status"],
        "forwarders": [{"id": GATEWAY}],
    }
]


class IngressEnv:
    def __init__(self, env: Env, app: SampleUpstream, cas: dict[str, DevCA]) -> None:
        self.env, self.app, self.cas = env, app, cas
        self.port = env.stack.envoy.listener_port("ingress_https")
        self.ca_file = env.state / "cas" / "test.example" / "bundle.pem"
        self.count = 0

    def client(self, cert: Any, key: Any) -> tuple[Path, Path]:
        self.count += 1
        return write_pair(self.env.state / "clients", f"c{self.count}", cert, key)

    def call(self, client: tuple[Path, Path] | None, path: str = "/v1/status", **kw: Any) -> Any:
        return mtls_request(self.port, self.ca_file, client, path, **kw)


def _start(state: Path, sock_dir: Path) -> IngressEnv:
    app = SampleUpstream({})
    app_port = app.start()
    cas: dict[str, DevCA] = {}

    def mutate(config: dict[str, Any], _: int) -> None:
        cas.update(add_file_identity(state, config, local_app=f"127.0.0.1:{app_port}"))
        config["ingress"] = {"rules": RULES}

    try:
        env = start_env(state, sock_dir, [task()], mutate=mutate)
    except BaseException:
        app.stop()
        raise
    return IngressEnv(env, app, cas)


@pytest.fixture(scope="module")
def ing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngressEnv]:
    sock_dir = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    running = _start(tmp_path_factory.mktemp("ingress"), sock_dir)
    yield running
    running.env.stack.stop()
    running.env.upstream.stop()
    running.app.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_allowed_caller_reaches_the_agent_with_the_verified_caller_header(ing: IngressEnv) -> None:
    reply = ing.call(
        ing.client(*make_leaf(ing.cas["test.example"], [PLANNER])),
        headers={"x-agent-authz-caller": "spiffe://test.example/forged", "x-forwarded-client-cert": "By=forged"},
    )
    assert reply.status == 200, reply
    received = ing.app.requests()[-1]
    assert received.headers["x-agent-authz-caller"] == PLANNER
    assert "forged" not in received.headers.get("x-forwarded-client-cert", "")
    record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
    assert record["direction"] == "ingress" and record["caller"] == PLANNER and record["agent"] == AGENT


def test_federated_caller(ing: IngressEnv) -> None:
    reply = ing.call(ing.client(*make_leaf(ing.cas["partner.example"], ["spiffe://partner.example/reports/q3"])))
    assert reply.status == 200


def test_wrong_spiffe_id_is_caller_not_allowed(ing: IngressEnv) -> None:
    reply = ing.call(ing.client(*make_leaf(ing.cas["test.example"], ["spiffe://test.example/ns/marketing/sa/bot"])))
    assert (reply.status, reply.reason) == (403, "caller_not_allowed")


def test_method_and_path(ing: IngressEnv) -> None:
    client = ing.client(*make_leaf(ing.cas["test.example"], [PLANNER]))
    assert ing.call(client, "/v1/secrets").reason == "path_not_allowed"
    assert ing.call(client, method="DELETE").reason == "method_not_allowed"


def test_no_client_certificate_fails_the_handshake(ing: IngressEnv) -> None:
    reply = ing.call(None)
    assert reply.status is None and reply.handshake_error is not None


NOW = dt.datetime.now(dt.UTC)
BAD = {
    "signed by another trust domain": lambda c: make_leaf(c["test.example"], [PLANNER], signer=c["partner.example"]),
    "expired": lambda c: make_leaf(
        c["test.example"], [PLANNER], not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(hours=1)
    ),
    "CA:TRUE leaf": lambda c: make_leaf(c["test.example"], [PLANNER], ca_flag=True),
    "keyCertSign leaf": lambda c: make_leaf(c["test.example"], [PLANNER], usage=key_usage(cert_sign=True)),
    "two URI SANs": lambda c: make_leaf(c["test.example"], [PLANNER, "spiffe://test.example/ns/x"]),
    "DNS SAN only": lambda c: make_leaf(c["test.example"], [], dns=["planner.test.example"]),
    "root ID": lambda c: make_leaf(c["test.example"], ["spiffe://test.example"]),
    "upper-case trust domain": lambda c: make_leaf(
        c["test.example"], ["spiffe://TEST.example/ns/orchestration/sa/planner"]
    ),
    "percent-encoded ID": lambda c: make_leaf(
        c["test.example"], ["spiffe://test.example/ns/orchestration/sa/pl%61nner"]
    ),
    "dot-segment ID": lambda c: make_leaf(
        c["test.example"], ["spiffe://test.example/ns/x/../orchestration/sa/planner"]
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_client_certificates_never_reach_the_agent(ing: IngressEnv, case: str) -> None:
    """Envoy's SPIFFE validator refuses some at the handshake; the sidecar refuses the rest."""
    before = len(ing.app.requests())
    reply = ing.call(ing.client(*BAD[case](ing.cas)))
    if reply.handshake_error is None:
        assert (reply.status, reply.reason) == (403, "untrusted_identity"), (case, reply)
        record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
        assert record["detail"].startswith("svid_")
    assert len(ing.app.requests()) == before


def test_jwt_svid_on_ingress(ing: IngressEnv) -> None:
    """A named forwarder presents its caller's JWT-SVID: the caller is the JWT-SVID's subject, both are
    recorded, and the token never reaches the app."""
    gateway = ing.client(*make_leaf(ing.cas["test.example"], [GATEWAY]))
    token = ing.cas["test.example"].issue_jwt(PLANNER, [AGENT])
    reply = ing.call(gateway, headers={"Authorization": f"Bearer {token}"})
    assert reply.status == 200
    received = ing.app.requests()[-1]
    assert received.headers["x-agent-authz-caller"] == PLANNER and "authorization" not in received.headers
    record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
    assert (record["caller"], record["peer"]) == (PLANNER, GATEWAY)
    none_alg = token.split(".")
    forged = ".".join(["eyJhbGciOiJub25lIiwia2lkIjoieCJ9", none_alg[1], ""])
    assert ing.call(gateway, headers={"Authorization": f"Bearer {forged}"}).reason == "untrusted_identity"


def test_a_jwt_svid_from_a_peer_that_is_no_forwarder_is_refused(ing: IngressEnv) -> None:
    other = "spiffe://test.example/ns/edge/sa/other"
    peer = ing.client(*make_leaf(ing.cas["test.example"], [other]))
    token = ing.cas["test.example"].issue_jwt(PLANNER, [AGENT])
    before = len(ing.app.requests())
    reply = ing.call(peer, headers={"Authorization": f"Bearer {token}"})
    assert (reply.status, reply.reason) == (403, "untrusted_identity")
    record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
    assert record["detail"].startswith("jwt_svid_peer_mismatch") and (record["caller"], record["peer"]) == (
        PLANNER,
        other,
    )
    assert len(ing.app.requests()) == before


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(
        st.sampled_from(["Authorization", "authorization", "AUTHORIZATION", "AuThOrIzAtIoN"]),
        min_size=2,
        max_size=3,
        unique=True,
    ),
    second=st.sampled_from(["own-jwt", "other-jwt", "Basic cGxhbm5lcjpwdw=="]),
)
def test_repeated_authorization_headers_through_envoy_are_refused(
    ing: IngressEnv, names: list[str], second: str
) -> None:
    """The header repeated under any casing reaches the sidecar comma-joined (HTTP/1.1 names are case-
    insensitive): refused, neither credential nor the mTLS peer decides, nothing reaches the app."""
    client = ing.client(*make_leaf(ing.cas["test.example"], [PLANNER]))
    token = ing.cas["test.example"].issue_jwt(PLANNER, [AGENT])
    other = ing.cas["test.example"].issue_jwt("spiffe://test.example/ns/x/sa/other", [AGENT])
    values = [f"Bearer {token}", {"own-jwt": f"Bearer {token}", "other-jwt": f"Bearer {other}"}.get(second, second)]
    values += [f"Bearer {token}"] * (len(names) - 2)
    before = len(ing.app.requests())
    reply = ing.call(client, headers=dict(zip(names, values, strict=True)))
    assert (reply.status, reply.reason) == (403, "untrusted_identity"), reply
    record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
    assert record["detail"].startswith("jwt_svid_duplicate") and record["peer"] == PLANNER
    assert len(ing.app.requests()) == before


def test_svid_rotation_without_restart(tmp_path: Path, short_dir: Path) -> None:
    """New SVID files: Envoy serves the new certificate, the sidecar reports the new serial."""
    ing = _start(tmp_path, short_dir)
    try:
        pid = ing.env.stack.envoy.proc.pid  # type: ignore[union-attr]
        client = ing.client(*make_leaf(ing.cas["test.example"], [PLANNER]))
        first = ing.call(client)
        assert first.status == 200 and first.server_serial is not None

        def serial() -> str:
            return json.loads(http_get(ing.env.stack.sidecar.admin_url + "/readyz")[1])["identity"]["serial"]

        assert serial() == first.server_serial
        new_dir = tmp_path / "svid-new"
        issued = ing.cas["test.example"].write_svid(AGENT, new_dir, name="agent")
        os.replace(issued.key, tmp_path / "svid" / "agent.key")
        os.replace(issued.cert, tmp_path / "svid" / "agent.pem")
        new_serial = wait_until(
            lambda: serial() if serial() != first.server_serial else None, timeout=10, what="sidecar serial"
        )
        wait_until(lambda: ing.call(client).server_serial == new_serial, timeout=15, what="envoy serves the new SVID")
        assert ing.env.stack.envoy.proc.pid == pid and ing.env.stack.envoy.alive()  # type: ignore[union-attr]
    finally:
        ing.env.stack.stop()
        ing.env.upstream.stop()
        ing.app.stop()


def test_a_caller_cannot_claim_another_certificate_or_context_in_headers(ing: IngressEnv) -> None:
    """The names Envoy's HTTP checks use for the client certificate and the route's context are
    headers a caller can send too: they never reach the check (Envoy's disallowed_headers)."""
    from urllib.parse import quote

    from cryptography.hazmat.primitives.serialization import Encoding

    planner_cert, _ = make_leaf(ing.cas["test.example"], [PLANNER])
    forged = {
        "x-agent-authz-peer-certificate": quote(planner_cert.public_bytes(Encoding.PEM).decode()),
        "x-agent-authz-context": '{"direction":"egress"}',
    }
    bot = ing.client(*make_leaf(ing.cas["test.example"], ["spiffe://test.example/ns/marketing/sa/bot"]))
    reply = ing.call(bot, headers=forged)
    assert (reply.status, reply.reason) == (403, "caller_not_allowed")
    record = ing.env.record(reply.headers["x-agent-authz-decision-id"])
    assert record["direction"] == "ingress" and record["caller"] == "spiffe://test.example/ns/marketing/sa/bot"
