"""Transparent interception in the policy: TLS passthrough and TCP connections, TLS origination, schema."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.audit.log import decision_record
from sidecar.config.loader import load_config
from sidecar.decision import AuthzRequest, Direction, Protocol, Reason, deny_status
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
    built = make_runtime(tmp_path, [task(egress=rules)], Clock())
    for host in ("secure.example.com", "once.example.com"):  # what the pod's DNS answered the agent
        built.addresses.remember(host, [(ipaddress.ip_address("10.0.0.9"), 30)], built.clock())
    return built


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


# -- the proxy's CONNECT ---------------------------------------------------------------------------------
def connect(authority: str) -> AuthzRequest:
    return AuthzRequest(Direction.EGRESS, "CONNECT", "", authority, "", {}, destination="127.0.0.1:15080")


@pytest.fixture
def proxy_runtime(tmp_path: Path) -> Any:
    write_keys(tmp_path)
    intercepted = {"name": "inside", "host": "api.secure.test", "tls": "intercept", "methods": ["GET"], "paths": ["*"]}
    alt = {**intercepted, "name": "alt", "host": "alt.secure.test", "port": 8443}
    later = task("later", egress=[{**intercepted, "name": "later", "host": "later.secure.test"}], revoked=True)
    config = base_config(tmp_path, [task(egress=[intercepted, alt, PASSTHROUGH, HTTP_ONLY]), later])
    config["intercept"] = {"state_dir": "intercept", "publish_dir": "trust"}
    write_config(tmp_path, config)
    from sidecar.runtime import Runtime

    return Runtime(tmp_path / "sidecar.yaml", clock=Clock())


@pytest.mark.parametrize(
    ("authority", "allow", "reason"),
    [
        ("api.secure.test:443", True, Reason.ALLOWED),
        ("API.Secure.Test.:443", True, Reason.ALLOWED),
        ("api.secure.test:8443", False, Reason.PORT_NOT_ALLOWED),
        ("alt.secure.test:8443", False, Reason.PORT_NOT_ALLOWED),  # tunnels end in the chains of port 443
        ("secure.example.com:443", False, Reason.TLS_NOT_ALLOWED),  # passthrough: the transparent listener only
        ("plain.example.com:443", False, Reason.TLS_NOT_ALLOWED),
        ("elsewhere.example.com:443", False, Reason.HOST_NOT_ALLOWED),
        ("later.secure.test:443", False, Reason.TASK_REVOKED),
        ("api.secure.test", False, Reason.BAD_REQUEST),  # RFC 9110 §9.3.6: host:port
        ("10.0.0.9:443", False, Reason.BAD_REQUEST),
        ("[::1]:443", False, Reason.BAD_REQUEST),
        ("api.secure.test:0", False, Reason.BAD_REQUEST),
        ("a..b:443", False, Reason.BAD_REQUEST),
    ],
)
def test_a_connect_is_decided_on_its_host_and_port(
    proxy_runtime: Any, authority: str, allow: bool, reason: Reason
) -> None:
    decision = proxy_runtime.decide(connect(authority), "d")
    assert (decision.allow, decision.reason) == (allow, reason), decision.detail
    assert decision.method == "CONNECT" and decision.http_status == (200 if allow else deny_status(reason))
    if allow:
        assert (decision.host, decision.port, decision.rule, decision.task_id) == (
            "api.secure.test",
            443,
            "inside",
            "t1",
        )
    record = decision_record(decision, request_id="", latency_us=1, now=0)
    assert record["method"] == "CONNECT" and record["decision"] == ("allow" if allow else "deny")


def test_a_connect_spends_no_budget(proxy_runtime: Any) -> None:
    for _ in range(3):
        assert proxy_runtime.decide(connect("api.secure.test:443"), "d").allow
    assert proxy_runtime.budgets.used(("t1", "")) == 0


def _inside(host: str, authority: str, connect_header: str | None) -> AuthzRequest:
    from sidecar.decision import Interception

    headers = {"x-agent-authz-connect": connect_header} if connect_header is not None else {}
    return AuthzRequest(
        Direction.EGRESS, "GET", "https", authority, "/x", headers, interception=Interception(host, 443),
        connect=connect_header or "",
    )  # fmt: skip


def test_a_tunnel_carries_only_the_name_it_was_opened_for(proxy_runtime: Any) -> None:
    ok = proxy_runtime.decide(_inside("api.secure.test", "api.secure.test", "api.secure.test:443"), "d")
    assert ok.allow and ok.connect == "api.secure.test:443"
    assert "x-agent-authz-connect" in ok.headers_to_remove  # Envoy's own header never leaves either
    fronted = proxy_runtime.decide(_inside("alt.secure.test", "alt.secure.test", "api.secure.test:443"), "d")
    assert (fronted.reason, fronted.http_status, fronted.connect) == (
        Reason.MISDIRECTED_REQUEST,
        421,
        "api.secure.test:443",
    )
    transparent = proxy_runtime.decide(_inside("api.secure.test", "api.secure.test", None), "d")
    assert transparent.allow and transparent.connect == ""


def test_the_connect_header_is_read_only_on_intercepting_chains() -> None:
    """Elsewhere it is the agent's: never a tunnel authority."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path = "GET", "api.secure.test", "/x"
    http.headers["x-agent-authz-connect"] = "forged.example:443"
    request.attributes.context_extensions["direction"] = "egress"
    assert parse_check_request(request.SerializeToString()).connect == ""
    request.attributes.context_extensions["intercept"] = "api.secure.test:443"
    assert parse_check_request(request.SerializeToString()).connect == "forged.example:443"


# -- the passthrough binding -----------------------------------------------------------------------------
def test_an_allowed_sni_towards_another_address_is_refused(runtime: Any) -> None:
    decision = runtime.decide(conn(destination="10.77.0.3:443"), "d")
    assert (decision.allow, decision.reason, decision.task_id) == (False, Reason.DESTINATION_MISMATCH, "t1")
    assert "10.77.0.3 is not an address of secure.example.com" in decision.detail
    assert runtime.budgets.used(("t1", "")) == 0  # nothing charged
    assert runtime.decide(conn(sni="SECURE.example.com.", destination="10.0.0.9:443"), "d").allow


def test_answers_bind_for_their_ttl_but_at_least_the_minimum(runtime: Any) -> None:
    now = runtime.clock()
    runtime.addresses.remember("secure.example.com", [(ipaddress.ip_address("10.0.0.8"), 5)], now)
    assert runtime.decide(conn(destination="10.0.0.8:443"), "d").allow  # a 5 s TTL is kept 60 s
    runtime.clock.now = now + 59
    assert runtime.decide(conn(destination="10.0.0.8:443"), "d").allow
    runtime.clock.now = now + 61
    assert runtime.decide(conn(destination="10.0.0.8:443"), "d").reason is Reason.DESTINATION_MISMATCH


def test_a_pinned_destination_is_an_address_of_its_name(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(egress=[PASSTHROUGH])], {"secure.example.com": "10.0.0.7:8443"})
    write_config(tmp_path, config)
    from sidecar.runtime import Runtime

    pinned = Runtime(tmp_path / "sidecar.yaml", clock=Clock())
    assert pinned.decide(conn(destination="10.0.0.7:443"), "d").allow
    assert pinned.decide(conn(destination="10.0.0.9:443"), "d").reason is Reason.DESTINATION_MISMATCH


def test_without_dns_answers_or_a_pin_nothing_passes_through(tmp_path: Path) -> None:
    bare = make_runtime(tmp_path, [task(egress=[PASSTHROUGH])], Clock())
    assert bare.decide(conn(), "d").reason is Reason.DESTINATION_MISMATCH
