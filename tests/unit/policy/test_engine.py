"""The policy engine on in-memory compiled policies: no files, no runtime, an explicit ``now``.

:func:`~sidecar.policy.engine.decide_egress`, :func:`~sidecar.policy.engine.dry_run` and
:func:`~sidecar.policy.connection.decide_connection` over a :class:`PolicyIndex` compiled from task
declarations in memory (the runtime tests drive the same functions through files and reloads).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import pytest

from sidecar.config.schema import TaskSpec
from sidecar.decision import AuthzRequest, Decision, Direction, Interception, Protocol, Reason
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.connection import decide_connection, parse_destination
from sidecar.policy.engine import decide_egress, dry_run
from sidecar.policy.model import Credential, PolicyIndex
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key
from sidecar.tokens.minter import TokenCache, TokenMinter
from tests.support.config import AGENT, API_HOST, OTHER_AGENT, task

NOW = 1_800_000_000.0
KEY = load_signing_key(generate_private_key_pem("ES256"), "ES256", file="mem", field="key")
READ = {"name": "read", "host": API_HOST, "methods": ["GET"], "paths": ["/v1/items/*"], "scope": "items:read"}


def policy(*tasks: dict[str, Any], credentials: Mapping[str, Mapping[int, Credential]] | None = None) -> PolicyIndex:
    """Compile ``tasks`` (first loaded ``NOW``) for :data:`AGENT`."""
    sources = [TaskSource(TaskSpec.model_validate(t), (credentials or {}).get(t["id"], {})) for t in tasks]
    return compile_policy(sources, lambda _task_id: NOW, AGENT)


def request(
    path: str = "/v1/items/1", method: str = "GET", host: str = API_HOST, scheme: str = "http", **kw: Any
) -> AuthzRequest:
    headers = kw.pop("headers", {})
    return AuthzRequest(Direction.EGRESS, method, scheme, host, path, headers, **kw)


class Engine:
    """One policy with its budgets and minter, deciding at an explicit instant."""

    def __init__(self, index: PolicyIndex) -> None:
        self.policy = index
        self.budgets = BudgetLedger()
        self.minter = TokenMinter(KEY, "https://issuer.example", 300, 0.25, False, TokenCache())

    def egress(self, req: AuthzRequest, now: float = NOW) -> Decision:
        return decide_egress(self.policy, req, now=now, decision_id="d", budgets=self.budgets, minter=self.minter)

    def connection(self, req: AuthzRequest, now: float = NOW) -> Decision:
        """A connection whose destination is an address its name resolved to (the binding has its own tests)."""
        resolved = parse_destination(req.destination)

        def addresses_of(_host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
            return frozenset({resolved[0]}) if resolved is not None else frozenset()

        return decide_connection(
            self.policy, req, now=now, decision_id="d", budgets=self.budgets, addresses_of=addresses_of
        )


def test_an_allowed_call_carries_its_obligations() -> None:
    decision = Engine(policy(task(egress=[READ]))).egress(
        request("/v1/items/../items/7?q=1", headers={"authorization": "Bearer agents-own", "x-agent-task": "t1"})
    )
    assert decision.allow and decision.reason is Reason.ALLOWED and decision.http_status == 200
    assert (decision.task_id, decision.rule, decision.agent) == ("t1", "read", AGENT)
    assert (decision.host, decision.port, decision.path, decision.method) == (API_HOST, 80, "/v1/items/7", "GET")
    headers = dict(decision.headers_to_set)
    assert headers["x-agent-authz-decision-id"] == "d" and headers["authorization"].startswith("Bearer ")
    assert headers["authorization"] != "Bearer agents-own"
    assert {"proxy-authorization", "x-agent-task"} <= set(decision.headers_to_remove)
    assert decision.token is not None and decision.token.aud == "http://api.internal"


@pytest.mark.parametrize(
    ("req", "reason", "status"),
    [
        (request(host="evil.example"), Reason.HOST_NOT_ALLOWED, 403),
        (request(host=f"{API_HOST}:8080"), Reason.PORT_NOT_ALLOWED, 403),
        (request(method="DELETE"), Reason.METHOD_NOT_ALLOWED, 403),
        (request("/v1/users/1"), Reason.PATH_NOT_ALLOWED, 403),
        (request("/v1/items%2F..%2Fusers"), Reason.BAD_REQUEST, 400),
        (request(method="CONNECT"), Reason.BAD_REQUEST, 400),
        (request(headers={"x-agent-task": "nope"}), Reason.UNKNOWN_TASK, 403),
        (request(headers={"x-agent-task": "theirs"}), Reason.TASK_NOT_FOR_AGENT, 403),
    ],
)
def test_deny_reasons(req: AuthzRequest, reason: Reason, status: int) -> None:
    engine = Engine(policy(task(egress=[READ]), task("theirs", agent=OTHER_AGENT, egress=[READ])))
    decision = engine.egress(req)
    assert not decision.allow and decision.reason is reason and decision.http_status == status
    assert decision.headers_to_set == () and decision.token is None
    assert engine.budgets.snapshot() == {}  # a deny spends nothing


def test_naming_another_agents_task_reveals_nothing_of_it() -> None:
    """The record of the deny is readable by the agent (the viewer): it must not carry the other task."""
    theirs = task("theirs", agent=OTHER_AGENT, egress=[READ], on_behalf_of="user:someone-else@example.com")
    decision = Engine(policy(task(egress=[READ]), theirs)).egress(request(headers={"x-agent-task": "theirs"}))
    assert decision.reason is Reason.TASK_NOT_FOR_AGENT and decision.task_id == "theirs"
    assert (decision.on_behalf_of, decision.txn, decision.act_chain) == (None, None, ())


def test_no_task_for_this_agent() -> None:
    assert Engine(policy(task(agent=OTHER_AGENT, egress=[READ]))).egress(request()).reason is Reason.NO_TASK


def test_validity_is_judged_at_the_given_instant() -> None:
    engine = Engine(policy(task(ttl="60s", egress=[READ]), task("later", egress=[READ], revoked=True)))
    assert engine.egress(request(headers={"x-agent-task": "t1"}), NOW + 59).allow
    assert engine.egress(request(headers={"x-agent-task": "t1"}), NOW + 60).reason is Reason.TASK_EXPIRED
    assert engine.egress(request(headers={"x-agent-task": "later"})).reason is Reason.TASK_REVOKED
    pending = Engine(policy(task(ttl=None, not_before="2027-01-15T09:00:00Z", expires_at="2027-01-15T10:00:00Z")))
    assert pending.egress(request(), NOW).reason is Reason.TASK_NOT_YET_VALID  # NOW is 2027-01-15T08:00:00Z


def test_task_selection_among_several_tasks() -> None:
    a = task("a", egress=[{"name": "a", "host": "a.internal", "methods": ["GET"], "paths": ["*"]}])
    b = task("b", egress=[{"name": "b", "host": "b.internal", "methods": ["GET"], "paths": ["*"]}])
    shared = task("c", egress=[{"name": "c", "host": "a.internal", "methods": ["GET"], "paths": ["/shared"]}])
    engine = Engine(policy(a, b, shared))
    assert engine.egress(request("/x", host="b.internal")).task_id == "b"
    assert engine.egress(request("/shared", host="a.internal")).reason is Reason.TASK_AMBIGUOUS
    assert engine.egress(request("/shared", host="a.internal", headers={"x-agent-task": "c"})).task_id == "c"
    deepest = engine.egress(request("/x", "POST", "b.internal"))
    assert deepest.reason is Reason.METHOD_NOT_ALLOWED and deepest.task_id == "b"


def test_budgets_are_exact_and_fall_through_to_a_rule_with_room() -> None:
    narrow = {**READ, "name": "narrow", "max_calls": 1}
    wide = {"name": "wide", "host": API_HOST, "methods": ["GET"], "paths": ["*"], "max_calls": 1}
    engine = Engine(policy(task(egress=[narrow, wide], max_calls=5)))
    assert [engine.egress(request()).rule for _ in range(2)] == ["narrow", "wide"]
    spent = engine.egress(request())
    assert spent.reason is Reason.BUDGET_EXHAUSTED and spent.http_status == 429
    rules = engine.policy.tasks_by_id["t1"].rules
    assert engine.budgets.snapshot() == {("t1", ""): 2, ("t1", rules[0].budget_key): 1, ("t1", rules[1].budget_key): 1}


def test_tls_originate_needs_an_originating_route() -> None:
    rule = {"name": "vault", "host": "vault.example", "methods": ["GET"], "paths": ["*"], "tls": "originate"}
    engine = Engine(policy(task(egress=[{**rule, "upstream_port": 8443}])))
    plain = engine.egress(request("/v1/x", host="vault.example"))
    assert plain.reason is Reason.TLS_ORIGINATION_UNAVAILABLE
    routed = engine.egress(request("/v1/x", host="vault.example", upstream_tls=True))
    assert routed.allow and routed.token is not None and routed.token.aud == "https://vault.example:8443"


def test_an_intercept_rule_judges_only_intercepted_requests_for_their_sni() -> None:
    rule = {"name": "api", "host": "api.example.com", "tls": "intercept", "methods": ["GET"], "paths": ["/v1/*"]}
    engine = Engine(policy(task(egress=[rule])))
    inside = Interception("api.example.com", 443, "dns:api.example.com ca:/ca.pem")
    allowed = engine.egress(request("/v1/x", host="api.example.com", scheme="https", interception=inside))
    assert allowed.allow and (allowed.tls, allowed.sni) == ("intercept", "api.example.com")
    assert allowed.upstream_verify == "dns:api.example.com ca:/ca.pem"
    assert allowed.token is not None and allowed.token.aud == "https://api.example.com"
    outside = engine.egress(request("/v1/x", host="api.example.com:443"))
    assert outside.reason is Reason.PORT_NOT_ALLOWED and outside.tls == ""
    misdirected = engine.egress(request("/v1/x", host="other.example.com", scheme="https", interception=inside))
    assert misdirected.reason is Reason.MISDIRECTED_REQUEST and misdirected.http_status == 421


def test_credentials_are_injected_and_the_agents_authorization_removed() -> None:
    rule = {"name": "paid", "host": "paid.example", "methods": ["POST"], "paths": ["/go"], "token": False}
    header = {**rule, "name": "bearer", "paths": ["/bearer"]}
    keys = {"t1": {0: Credential("x-api-key", "sk-live"), 1: Credential("authorization", "Bearer sk-b")}}
    engine = Engine(policy(task(egress=[rule, header]), credentials=keys))
    keyed = engine.egress(request("/go", "POST", "paid.example", headers={"authorization": "Bearer mine"}))
    assert dict(keyed.headers_to_set)["x-api-key"] == "sk-live" and "authorization" in keyed.headers_to_remove
    bearer = engine.egress(request("/bearer", "POST", "paid.example"))
    assert dict(bearer.headers_to_set)["authorization"] == "Bearer sk-b"
    assert "authorization" not in bearer.headers_to_remove and keyed.token is None


def test_dry_run_lets_a_deny_through_without_obligations() -> None:
    engine = Engine(policy(task(egress=[READ])))
    denied = dry_run(engine.egress(request("/v1/users/1")))
    assert denied.allow and denied.reason is Reason.DRY_RUN and denied.would_reason is Reason.PATH_NOT_ALLOWED
    assert denied.headers_to_set == (("x-agent-authz-decision-id", "d"),) and denied.token is None
    # the agent's credentials, and the list-filter marker only the sidecar may set
    assert {"authorization", "proxy-authorization", "x-agent-task", "x-agent-authz-list-filter"} == set(
        denied.headers_to_remove
    )
    allowed = dry_run(engine.egress(request()))
    assert allowed.allow and allowed.reason is Reason.ALLOWED and allowed.dry_run and allowed.token is not None


def _connection(sni: str = "secure.example", destination: str = "10.0.0.9:443", **kw: Any) -> AuthzRequest:
    protocol = kw.pop("protocol", Protocol.TLS)
    return AuthzRequest(Direction.EGRESS, "", "", "", "", {}, protocol=protocol, sni=sni, destination=destination, **kw)


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (_connection(), Reason.ALLOWED),
        (_connection(destination="127.0.0.1:443"), Reason.UNKNOWN_DESTINATION),
        (_connection(protocol=Protocol.TCP), Reason.TCP_NOT_ALLOWED),
        (_connection(sni=""), Reason.NO_SNI),
        (_connection(sni="10.0.0.9"), Reason.BAD_REQUEST),
        (_connection(sni="other.example"), Reason.HOST_NOT_ALLOWED),
        (_connection(sni="api.internal"), Reason.TLS_NOT_ALLOWED),
        (_connection(destination="10.0.0.9:8443"), Reason.PORT_NOT_ALLOWED),
        (_connection(destination="", via_connect=True), Reason.TLS_NOT_ALLOWED),
    ],
)
def test_connection_decisions(req: AuthzRequest, reason: Reason) -> None:
    passthrough = {"name": "tls", "host": "secure.example", "tls": "passthrough", "max_calls": 1}
    engine = Engine(policy(task(egress=[passthrough, READ])))
    decision = engine.connection(req)
    assert decision.reason is reason and decision.allow is (reason is Reason.ALLOWED)
    if decision.allow:
        assert (decision.task_id, decision.rule, decision.host, decision.port) == ("t1", "tls", "secure.example", 443)
        assert engine.connection(req).reason is Reason.BUDGET_EXHAUSTED  # one connection is one call
