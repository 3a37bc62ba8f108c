"""``tls: intercept`` in the schema, the decision, the records and the active targets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit.log import decision_record
from sidecar.bootstrap.names import InterceptTarget
from sidecar.config.loader import load_config
from sidecar.decision import AuthzRequest, Direction, Interception, Protocol, Reason
from sidecar.errors import ConfigError
from sidecar.runtime import Runtime
from sidecar.tls_intercept.targets import active_targets
from tests.support.config import AGENT, OTHER_AGENT, base_config, task, write_config, write_keys
from tests.support.runtime import Clock, claims_of

API = "api.example.com"
KEY = "sk-unit-0123456789"
INTERCEPT = {
    "name": "api",
    "host": API,
    "tls": "intercept",
    "methods": ["GET"],
    "paths": ["/v1/*"],
    "credential": {"header": "x-api-key", "file": "api.key"},
}
PLAIN = {"name": "plain", "host": API, "methods": ["GET"], "paths": ["/v1/*"]}
VERIFY = f"dns:{API} ca:/etc/ssl/certs/ca-certificates.crt"


def _config(tmp_path: Path, tasks: list[dict[str, Any]], intercept: bool = True) -> dict[str, Any]:
    write_keys(tmp_path)
    (tmp_path / "api.key").write_text(KEY + "\n")
    config = base_config(tmp_path, tasks)
    if intercept:
        config["intercept"] = {"state_dir": "state", "publish_dir": "trust"}
    return config


def _runtime(tmp_path: Path, tasks: list[dict[str, Any]], clock: Clock | None = None) -> Runtime:
    write_config(tmp_path, _config(tmp_path, tasks))
    return Runtime(tmp_path / "sidecar.yaml", clock=clock or Clock())


def intercepted(
    path: str = "/v1/items", method: str = "GET", authority: str = API, sni: str = f"{API}:443"
) -> AuthzRequest:
    """A request as the intercepting chain of ``sni`` (``host:port``) sends it (context from the rendered route)."""
    host, _, port = sni.rpartition(":")
    return AuthzRequest(
        Direction.EGRESS,
        method,
        "https",
        authority,
        path,
        {},
        destination="10.0.0.9:443",
        interception=Interception(host, int(port), VERIFY),
    )


def test_an_intercepted_request_is_judged_and_gets_token_and_key(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, [task(egress=[INTERCEPT])])
    decision = runtime.decide(intercepted(), "d1")
    assert decision.allow and decision.rule == "api"
    headers = dict(decision.headers_to_set)
    assert headers["x-api-key"] == KEY and headers["authorization"].startswith("Bearer ")
    assert claims_of(runtime, decision)["aud"] == f"https://{API}"
    assert (decision.tls, decision.sni, decision.upstream_verify) == ("intercept", API, VERIFY)
    record = decision_record(decision, request_id="r", latency_us=1, now=0)
    assert (record["tls"], record["sni"], record["upstream_verify"], record["port"]) == ("intercept", API, VERIFY, 443)
    assert KEY not in repr(record) and "Bearer" not in repr(record)
    denied = runtime.decide(intercepted("/admin"), "d2")
    assert (denied.reason, denied.http_status, denied.tls, denied.sni) == (
        Reason.PATH_NOT_ALLOWED,
        403,
        "intercept",
        API,
    )


def test_plain_http_records_carry_no_tls_field(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, [task(egress=[PLAIN])])
    decision = runtime.decide(AuthzRequest(Direction.EGRESS, "GET", "http", API, "/v1/x", {}), "d")
    assert decision.allow and "tls" not in decision_record(decision, request_id="", latency_us=1, now=0)


@pytest.mark.parametrize(
    ("authority", "sni"),
    [("other.example.com", f"{API}:443"), (f"{API}:8443", f"{API}:443"), (API, f"{API}:8443")],
)
def test_a_request_for_another_host_or_port_than_the_sni_is_misdirected(
    tmp_path: Path, authority: str, sni: str
) -> None:
    runtime = _runtime(tmp_path, [task(egress=[INTERCEPT, {**INTERCEPT, "name": "o", "host": "other.example.com"}])])
    decision = runtime.decide(intercepted(authority=authority, sni=sni), "d")
    assert (decision.allow, decision.reason, decision.http_status) == (False, Reason.MISDIRECTED_REQUEST, 421)
    assert decision.headers_to_set == ()


def test_intercept_rules_judge_only_intercepted_requests(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, [task(egress=[INTERCEPT])])
    plain = AuthzRequest(Direction.EGRESS, "GET", "http", f"{API}:443", "/v1/items", {})
    assert runtime.decide(plain, "a").reason is Reason.PORT_NOT_ALLOWED  # nor on https-looking plain HTTP
    assert runtime.decide(AuthzRequest(Direction.EGRESS, "GET", "http", API, "/v1/items", {}), "b").allow is False
    runtime = _runtime(tmp_path, [task(egress=[{**PLAIN, "port": 443}])])
    assert runtime.decide(intercepted(), "c").reason is Reason.PORT_NOT_ALLOWED  # plain rules never match inside TLS


def test_a_connect_reaching_the_sidecar_is_decided(tmp_path: Path) -> None:
    """Only to port 443 of an intercepted host (test_connection.py has the whole rule)."""
    runtime = _runtime(tmp_path, [task(egress=[INTERCEPT])])
    decision = runtime.decide(AuthzRequest(Direction.EGRESS, "CONNECT", "", f"{API}:8443", "", {}), "d")
    assert decision.reason is Reason.PORT_NOT_ALLOWED and "443" in decision.detail
    assert runtime.decide(AuthzRequest(Direction.EGRESS, "CONNECT", "", f"{API}:443", "", {}), "d").allow


def test_connections_inside_a_connect_tunnel_are_refused(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, [task(egress=[INTERCEPT, {"host": "pass.example.com", "tls": "passthrough"}])])

    def tunnel(sni: str) -> AuthzRequest:
        return AuthzRequest(Direction.EGRESS, "", "", "", "", {}, protocol=Protocol.TLS, sni=sni, via_connect=True)

    assert runtime.decide(tunnel("pass.example.com"), "a").reason is Reason.TLS_NOT_ALLOWED
    assert runtime.decide(tunnel("else.example.com"), "b").reason is Reason.HOST_NOT_ALLOWED
    assert runtime.decide(tunnel(""), "c").reason is Reason.NO_SNI
    assert runtime.decide(tunnel("bad!.example.com"), "d").reason is Reason.BAD_REQUEST


@pytest.mark.parametrize(
    ("rules", "intercept", "message"),
    [
        ([{**INTERCEPT, "host": "*.example.com"}], True, "'*.example.com' is a wildcard"),
        ([{**INTERCEPT, "host": "10.1.2.3"}], True, "'10.1.2.3' is an IP address"),
        ([{**INTERCEPT, "host": "printer.local.1"}], True, "is an IP address"),
        ([INTERCEPT], False, "'tls: intercept' needs the 'intercept' section"),
        ([INTERCEPT, {"host": API, "tls": "passthrough"}], True, "either passed through or intercepted"),
        (
            [{**INTERCEPT, "upstream_port": 8443}, {**INTERCEPT, "name": "b", "upstream_port": 9443}],
            True,
            "one upstream per host and port",
        ),
        ([{**PLAIN, "upstream_port": 8443}], True, "'upstream_port' needs 'tls: originate' or 'tls: intercept'"),
    ],
)
def test_schema_refuses(tmp_path: Path, rules: list[dict[str, Any]], intercept: bool, message: str) -> None:
    write_config(tmp_path, _config(tmp_path, [task(egress=rules)], intercept))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "sidecar.yaml")
    assert message in str(exc.value)


def test_a_passthrough_and_an_intercept_rule_on_different_ports_agree(tmp_path: Path) -> None:
    rules = [INTERCEPT, {"host": API, "tls": "passthrough", "port": 8443}]
    write_config(tmp_path, _config(tmp_path, [task(egress=rules)]))
    assert load_config(tmp_path / "sidecar.yaml").settings.tasks[0].egress[1].agent_port == 8443


@pytest.mark.parametrize(
    ("intercept", "message"),
    [
        ({"state_dir": "a", "publish_dir": "a/b"}, "must not nest"),
        ({"state_dir": "x", "publish_dir": "x"}, "must not nest"),
        ({"state_dir": "a", "publish_dir": "b", "leaf_ttl": "1s"}, "leaf_ttl must be between"),
        ({"state_dir": "a", "publish_dir": "b", "ca_ttl": "1m"}, "ca_ttl must be between"),
        ({"state_dir": "a", "publish_dir": "b", "ca_ttl": "1h", "leaf_ttl": "2h"}, "shorter than ca_ttl"),
        ({"state_dir": "a", "publish_dir": "b", "leaf_refresh_ahead": 1}, "less than 1"),
        ({"state_dir": "a"}, "publish_dir"),
    ],
)
def test_intercept_section_errors(tmp_path: Path, intercept: dict[str, Any], message: str) -> None:
    config = _config(tmp_path, [])
    config["intercept"] = intercept
    write_config(tmp_path, config)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "sidecar.yaml")
    assert message in str(exc.value)


def test_a_task_file_that_conflicts_with_the_config_is_refused_on_reload(tmp_path: Path) -> None:
    config = _config(tmp_path, [task(egress=[INTERCEPT])])
    config["task_files"] = [{"path": "pod/task"}]
    (tmp_path / "pod").mkdir()
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml", clock=Clock())
    conflicting = {"id": "late", "purpose": "p", "ttl": "1h", "egress": [{"host": API, "tls": "passthrough"}]}
    (tmp_path / "pod" / "task").write_text(yaml.safe_dump(conflicting))
    assert runtime.reload() is False
    assert runtime.last_error is not None and "either passed through or intercepted" in runtime.last_error
    assert "late" not in runtime.snapshot.policy.tasks_by_id


def test_active_targets_follow_validity_and_revocation(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    # 1_800_000_000 is 2027-01-15T08:00:00Z; "now" expires at 09:00, "later" runs 08:30-09:30
    tasks = [
        task("now", egress=[INTERCEPT, {**INTERCEPT, "name": "p", "host": "alt.example.com", "port": 8443}]),
        task(
            "later",
            egress=[{**INTERCEPT, "name": "l", "host": "later.example.com"}],
            not_before="2027-01-15T08:30:00Z",
            ttl="1h",
        ),
        task("gone", egress=[{**INTERCEPT, "name": "g", "host": "gone.example.com"}], revoked=True),
        task("plain", egress=[PLAIN]),
        task("theirs", agent=OTHER_AGENT, egress=[{**INTERCEPT, "name": "t", "host": "theirs.example.com"}]),
    ]
    runtime = _runtime(tmp_path, tasks, clock)
    policy = runtime.snapshot.policy
    assert policy.agent == AGENT
    targets, next_change = active_targets(policy, clock.now)
    assert targets == {InterceptTarget(API, 443, 443), InterceptTarget("alt.example.com", 8443, 8443)}
    assert next_change == pytest.approx(clock.now + 1800)  # "later" starts
    targets, next_change = active_targets(policy, clock.now + 2700)
    assert InterceptTarget("later.example.com", 443, 443) in targets and InterceptTarget(API, 443, 443) in targets
    assert next_change == pytest.approx(clock.now + 3600)  # "now" expires
    targets, next_change = active_targets(policy, clock.now + 3600)
    assert targets == {InterceptTarget("later.example.com", 443, 443)}
    assert active_targets(policy, clock.now + 10 * 3600) == (frozenset(), math.inf)
