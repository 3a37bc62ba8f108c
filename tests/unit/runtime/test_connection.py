"""Transparent interception in the policy: TLS passthrough and TCP connections, TLS origination, schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.audit.log import decision_record
from sidecar.config.loader import load_config
from sidecar.decision import AuthzRequest, Direction, Protocol, Reason
from sidecar.envoy_authz.translate import parse_check_request
from sidecar.errors import BadRequestError, ConfigError
from sidecar.policy.connection import parse_destination, sni_host
from sidecar.wire import DIRECTION_METADATA, PROTOCOL_METADATA
from tests.support.config import API_HOST, base_config, task, write_config, write_keys
from tests.support.runtime import Clock, claims_of, make_runtime, req

PASSTHROUGH = {"name": "tls-api", "host": "secure.example.com", "tls": "passthrough"}
HTTP_ONLY = {"name": "http-api", "host": "plain.example.com", "methods": ["GET"], "paths": ["*"]}
ORIGINATE = {
    "name": "orig",
    "host": "vault.example.com",
    "methods": ["GET"],
    "paths": ["/v1/*"],
    "tls": "originate",
    "upstream_port": 8443,
}


def conn(sni: str = "secure.example.com", destination: str = "10.0.0.9:443", protocol: Protocol = Protocol.TLS):
    return AuthzRequest(Direction.EGRESS, "", "", "", "", {}, protocol=protocol, sni=sni, destination=destination)


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    rules = [PASSTHROUGH, HTTP_ONLY, ORIGINATE, {**PASSTHROUGH, "name": "budgeted", "host": "once.example.com"}]
    rules[-1]["max_calls"] = 1
    return make_runtime(tmp_path, [task(egress=rules)], Clock())


def test_tls_passthrough_is_allowed_on_sni_and_port(runtime: Any) -> None:
    decision = runtime.decide(conn(), "d1")
    assert decision.allow and decision.rule == "tls-api" and decision.task_id == "t1"
    assert (decision.host, decision.port, decision.sni, decision.destination) == (
        "secure.example.com",
        443,
        "secure.example.com",
        "10.0.0.9:443",
    )
    assert decision.headers_to_set == () and decision.token is None
    record = decision_record(decision, request_id="", latency_us=1, now=0)
    assert (record["protocol"], record["sni"], record["destination"]) == ("tls", "secure.example.com", "10.0.0.9:443")


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (conn(sni="other.example.com"), Reason.HOST_NOT_ALLOWED),
        (conn(sni="plain.example.com"), Reason.TLS_NOT_ALLOWED),
        (conn(sni="vault.example.com"), Reason.TLS_NOT_ALLOWED),
        (conn(destination="10.0.0.9:8443"), Reason.PORT_NOT_ALLOWED),
        (conn(sni=""), Reason.NO_SNI),
        (conn(sni="bad_host!"), Reason.BAD_REQUEST),
        (conn(sni="10.0.0.9"), Reason.BAD_REQUEST),
        (conn(sni="secure.example.com:443"), Reason.BAD_REQUEST),
        (conn(sni="a\x00b.example.com"), Reason.BAD_REQUEST),
        (conn(destination=""), Reason.UNKNOWN_DESTINATION),
        (conn(destination="127.0.0.1:15001"), Reason.UNKNOWN_DESTINATION),
        (conn(destination="[::1]:15001"), Reason.UNKNOWN_DESTINATION),
        (conn(destination="10.0.0.9:0"), Reason.UNKNOWN_DESTINATION),
        (conn(protocol=Protocol.TCP, sni=""), Reason.TCP_NOT_ALLOWED),
        (conn(protocol=Protocol.TCP, sni="", destination="127.0.0.1:15001"), Reason.UNKNOWN_DESTINATION),
    ],
)
def test_connection_denies(runtime: Any, request_: AuthzRequest, reason: Reason) -> None:
    decision = runtime.decide(request_, "d")
    assert not decision.allow
    assert decision.reason is reason, decision.detail
    assert decision.http_status == (400 if reason is Reason.BAD_REQUEST else 403)


def test_connection_budget(runtime: Any) -> None:
    assert runtime.decide(conn(sni="once.example.com"), "a").allow
    assert runtime.decide(conn(sni="once.example.com"), "b").reason is Reason.BUDGET_EXHAUSTED


def test_passthrough_rule_never_allows_http(runtime: Any) -> None:
    decision = runtime.decide(req("/", host="secure.example.com:443"), "d")
    assert not decision.allow and decision.reason is Reason.PORT_NOT_ALLOWED


def test_originate_needs_an_originating_route(runtime: Any) -> None:
    plain = runtime.decide(req("/v1/x", host="vault.example.com"), "d1")
    assert plain.reason is Reason.TLS_ORIGINATION_UNAVAILABLE
    originating = AuthzRequest(
        Direction.EGRESS,
        "GET",
        "http",
        "vault.example.com",
        "/v1/x",
        {},
        upstream_tls=True,
    )
    decision = runtime.decide(originating, "d2")
    assert decision.allow and decision.rule == "orig"
    assert claims_of(runtime, decision)["aud"] == "https://vault.example.com:8443"


def test_no_task_and_expired_task_for_connections(tmp_path: Path) -> None:
    assert make_runtime(tmp_path, []).decide(conn(), "d").reason is Reason.NO_TASK
    clock = Clock()
    runtime = make_runtime(tmp_path, [task(egress=[PASSTHROUGH])], clock)
    clock.now += 7200
    assert runtime.decide(conn(), "d").reason is Reason.TASK_EXPIRED


def test_helpers() -> None:
    assert sni_host("Secure.Example.COM.") == "secure.example.com"
    with pytest.raises(BadRequestError):
        sni_host("[::1]")
    assert parse_destination("[2001:db8::1]:443") is not None
    assert parse_destination("10.0.0.1") is None
    assert parse_destination("0.0.0.0:80") is None
    assert parse_destination("nonsense:80") is None


def _network_check(sni: str | None, address: str = "10.0.0.9", port: int = 443) -> bytes:
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.destination.address.socket_address.address = address
    attrs.destination.address.socket_address.port_value = port
    if sni is not None:
        attrs.tls_session.sni = sni
    return request.SerializeToString()


def test_parse_network_check() -> None:
    meta = {DIRECTION_METADATA: "egress", PROTOCOL_METADATA: "tls"}
    parsed = parse_check_request(_network_check("secure.example.com"), meta)
    assert (parsed.protocol, parsed.sni, parsed.destination) == (Protocol.TLS, "secure.example.com", "10.0.0.9:443")
    v6 = parse_check_request(_network_check(None, "2001:db8::1", 8443), {**meta, PROTOCOL_METADATA: "tcp"})
    assert (v6.protocol, v6.sni, v6.destination) == (Protocol.TCP, "", "[2001:db8::1]:8443")


@pytest.mark.parametrize(
    "meta",
    [
        None,
        {},
        {DIRECTION_METADATA: "egress"},
        {DIRECTION_METADATA: "ingress", PROTOCOL_METADATA: "tls"},
        {
            DIRECTION_METADATA: "egress",
            PROTOCOL_METADATA: "udp",
        },
    ],
)
def test_network_check_without_its_context_is_bad_request(meta: dict[str, str] | None) -> None:
    with pytest.raises(BadRequestError, match="no HTTP attributes"):
        parse_check_request(_network_check("secure.example.com"), meta)


@pytest.mark.parametrize(
    ("rule", "envoy", "field", "message"),
    [
        ({**PASSTHROUGH, "methods": ["GET"]}, {}, "tasks[0].egress[0]", "remove methods"),
        ({**PASSTHROUGH, "token": True}, {}, "tasks[0].egress[0]", "remove token"),
        ({**HTTP_ONLY, "upstream_port": 443}, {}, "tasks[0].egress[0]", "'upstream_port' needs 'tls: originate'"),
        ({**ORIGINATE, "host": "*.example.com"}, {}, "tasks[0].egress[0]", "needs an exact host"),
        (
            {**HTTP_ONLY, "tls": "sometimes"},
            {},
            "tasks[0].egress[0].tls",
            "'none', 'passthrough', 'originate' or 'intercept'",
        ),
        (HTTP_ONLY, {"outbound_port": 15001, "egress_port": 15001}, "envoy", "must differ"),
        (HTTP_ONLY, {"outbound_port": 70000}, "envoy.outbound_port", "less than or equal to 65535"),
        (HTTP_ONLY, {"inbound_redirect": True, "ingress_port": 0}, "envoy", "fixed ingress_port"),
        (HTTP_ONLY, {"inbound_redirect": True, "ingress_port": 15006}, "(top)", "needs an 'identity' source"),
    ],
)
def test_schema_errors(tmp_path: Path, rule: dict[str, Any], envoy: dict[str, Any], field: str, message: str) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=[rule])])
    config["envoy"].update(envoy)
    path = write_config(tmp_path, config)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value)
    assert (exc.value.field or "(top)") == field, str(exc.value)


def test_originate_rules_must_agree_on_the_upstream_port(tmp_path: Path) -> None:
    write_keys(tmp_path)
    tasks = [task("a", egress=[ORIGINATE]), task("b", egress=[{**ORIGINATE, "upstream_port": 443}])]
    path = write_config(tmp_path, base_config(tmp_path, tasks))
    with pytest.raises(ConfigError, match="one upstream per host"):
        load_config(path)


def test_originate_hosts(tmp_path: Path) -> None:
    write_keys(tmp_path)
    tasks = [task("a", egress=[ORIGINATE, {**ORIGINATE, "name": "o2", "host": API_HOST, "upstream_port": None}])]
    settings = load_config(write_config(tmp_path, base_config(tmp_path, tasks))).settings
    assert settings.originate_hosts() == {"vault.example.com": 8443, API_HOST: 443}
