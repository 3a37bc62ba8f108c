"""The egress decision, against a real compiled config and a controllable clock."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest

from sidecar.decision import AuthzRequest, Direction, Reason
from sidecar.errors import ConfigError
from sidecar.runtime import Runtime
from tests.support.config import (
    AGENT,
    API_AUDIENCE,
    API_HOST,
    OTHER_AGENT,
    base_config,
    task,
    write_config,
    write_keys,
)
from tests.support.runtime import Clock, claims_of, make_runtime, req


def test_allowed_call_gets_a_task_scoped_token(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task(on_behalf_of="user:jane@example.com")], clock)
    decision = runtime.decide(req("/v1/items/42?x=1"), "d1")
    assert decision.allow and decision.reason is Reason.ALLOWED and decision.http_status == 200
    assert decision.task_id == "t1" and decision.rule == "api-read" and decision.path == "/v1/items/42"
    claims = claims_of(runtime, decision)
    assert claims["sub"] == "user:jane@example.com"
    assert claims["act"] == {"sub": AGENT}
    assert claims["client_id"] == AGENT
    assert claims["aud"] == API_AUDIENCE
    assert claims["scope"] == "items:read"
    assert claims["txn"] == "t1"
    assert claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 300
    assert all(isinstance(claims[k], int) for k in ("iat", "nbf", "exp"))
    assert decision.token is not None and decision.token.jti == claims["jti"]
    token = dict(decision.headers_to_set)["authorization"].removeprefix("Bearer ")
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert {"proxy-authorization", "x-agent-task"} <= set(decision.headers_to_remove)
    assert dict(decision.headers_to_set)["x-agent-authz-decision-id"] == "d1"


def test_subject_is_agent_without_on_behalf_of(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    assert claims_of(runtime, runtime.decide(req(), "d"))["sub"] == AGENT


def test_token_never_outlives_task(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task(ttl="90s")], clock)
    clock.now += 30
    decision = runtime.decide(req(), "d")
    assert decision.token is not None
    assert decision.token.exp == int(clock.now - 30 + 90)


def test_default_audience_is_scheme_host_port(tmp_path: Path) -> None:
    rules = [{"host": "*.svc.internal", "port": 8080, "methods": ["GET"], "paths": ["*"]}]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    decision = runtime.decide(req("/x", host="Orders.SVC.internal.:8080"), "d")
    assert decision.allow and decision.token is not None
    assert decision.token.aud == "http://orders.svc.internal:8080"
    rules[0].pop("port")
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    assert runtime.decide(req("/x", host="a.svc.internal:80"), "d").token.aud == "http://a.svc.internal"  # type: ignore[union-attr]


def test_tokens_are_cached_and_refreshed_ahead(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task()], clock, max_token_ttl="100s", refresh_ahead=0.25)
    first = runtime.decide(req(), "a").token
    second = runtime.decide(req("/v1/items/2"), "b").token
    assert first is not None and second is not None
    assert second.jti == first.jti and second.cached and not first.cached
    assert runtime.snapshot.minter.minted == 1
    clock.now += 80  # past refresh_at (75 s): served from cache, refreshed behind it
    third = runtime.decide(req(), "c").token
    assert third is not None and third.jti == first.jti
    fourth = runtime.decide(req(), "d").token
    assert fourth is not None and fourth.jti != first.jti
    assert runtime.snapshot.minter.minted == 2


def test_eddsa_tokens(tmp_path: Path) -> None:
    write_keys(tmp_path, "EdDSA")
    config = base_config(tmp_path, [task()])
    config["issuer"]["algorithm"] = "EdDSA"
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml", clock=Clock())
    decision = runtime.decide(req(), "d")
    token = dict(decision.headers_to_set)["authorization"].removeprefix("Bearer ")
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert claims_of(runtime, decision)["txn"] == "t1"


def test_per_call_minting(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()], mint_per_call=True)
    jtis = {runtime.decide(req(), str(i)).token.jti for i in range(3)}  # type: ignore[union-attr]
    assert len(jtis) == 3


def test_distinct_audiences_get_distinct_tokens(tmp_path: Path) -> None:
    rules = [
        {"name": "a", "host": "a.internal", "methods": ["GET"], "paths": ["*"], "scope": "a"},
        {"name": "b", "host": "b.internal", "methods": ["GET"], "paths": ["*"], "scope": "b"},
    ]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    ta = runtime.decide(req("/", host="a.internal"), "1").token
    tb = runtime.decide(req("/", host="b.internal"), "2").token
    assert ta is not None and tb is not None and ta.jti != tb.jti and ta.aud != tb.aud


@pytest.mark.parametrize(
    ("request_", "reason", "status"),
    [
        (req("/v1/items/1", host="evil.example"), Reason.HOST_NOT_ALLOWED, 403),
        (req("/v1/items/1", host=f"{API_HOST}:8080"), Reason.PORT_NOT_ALLOWED, 403),
        (req("/v1/items/1", method="DELETE"), Reason.METHOD_NOT_ALLOWED, 403),
        (req("/v1/users/1"), Reason.PATH_NOT_ALLOWED, 403),
        (req("/v1/items"), Reason.PATH_NOT_ALLOWED, 403),
        (req("/v1/items/../users"), Reason.PATH_NOT_ALLOWED, 403),
        (req("/v1/items%2F..%2Fusers"), Reason.BAD_REQUEST, 400),
        (req("/v1/items/1", host=""), Reason.BAD_REQUEST, 400),
        (req("/v1/items/1#frag"), Reason.BAD_REQUEST, 400),
        (req("/v1/items/1", x_agent_task="nope"), Reason.UNKNOWN_TASK, 403),
    ],
)
def test_deny_reasons(tmp_path: Path, request_: AuthzRequest, reason: Reason, status: int) -> None:
    runtime = make_runtime(tmp_path, [task()])
    decision = runtime.decide(request_, "d")
    assert not decision.allow
    assert decision.reason is reason and decision.http_status == status
    assert decision.headers_to_set == () and decision.token is None


def test_no_task_for_agent(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task(agent=OTHER_AGENT)])
    assert runtime.decide(req(), "d").reason is Reason.NO_TASK


def test_another_agents_task_is_denied(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task("mine"), task("theirs", agent=OTHER_AGENT)])
    assert runtime.decide(req(x_agent_task="theirs"), "d").reason is Reason.TASK_NOT_FOR_AGENT
    assert runtime.decide(req(x_agent_task="mine"), "d").allow


def test_validity_window(tmp_path: Path) -> None:
    clock = Clock(1_900_000_000.0)
    runtime = make_runtime(
        tmp_path,
        [task(ttl=None, not_before="2030-03-17T17:46:50Z", expires_at="2030-03-17T17:47:40Z")],
        clock,
    )
    # 2030-03-17T17:46:40Z == 1_900_000_000
    assert runtime.decide(req(), "d").reason is Reason.TASK_NOT_YET_VALID
    clock.now += 10
    assert runtime.decide(req(), "d").allow
    clock.now += 50
    assert runtime.decide(req(), "d").reason is Reason.TASK_EXPIRED


def test_ttl_counts_from_first_load_and_reload_does_not_extend(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task(ttl="60s")], clock)
    clock.now += 40
    config = base_config(tmp_path, [task(ttl="60s", purpose="edited")])
    write_config(tmp_path, config)
    assert runtime.reload()
    clock.now += 25
    assert runtime.decide(req(), "d").reason is Reason.TASK_EXPIRED


def test_revoked_task(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task(revoked=True)])
    decision = runtime.decide(req(), "d")
    assert decision.reason is Reason.TASK_REVOKED and decision.http_status == 403


def test_rule_budget_is_exact_and_answers_429(tmp_path: Path) -> None:
    rules = [{"name": "r", "host": API_HOST, "methods": ["GET"], "paths": ["*"], "max_calls": 3}]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    results = [runtime.decide(req(), str(i)) for i in range(5)]
    assert [d.allow for d in results] == [True, True, True, False, False]
    assert results[3].reason is Reason.BUDGET_EXHAUSTED and results[3].http_status == 429


def test_denied_calls_do_not_spend_budget(tmp_path: Path) -> None:
    rules = [{"name": "r", "host": API_HOST, "methods": ["GET"], "paths": ["/ok"], "max_calls": 1}]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    for _ in range(3):
        assert not runtime.decide(req("/nope"), "x").allow
    assert runtime.decide(req("/ok"), "y").allow


def test_task_budget_spans_rules(tmp_path: Path) -> None:
    rules = [
        {"name": "a", "host": "a.internal", "methods": ["GET"], "paths": ["*"]},
        {"name": "b", "host": "b.internal", "methods": ["GET"], "paths": ["*"]},
    ]
    runtime = make_runtime(tmp_path, [task(egress=rules, max_calls=2)])
    assert runtime.decide(req("/", host="a.internal"), "1").allow
    assert runtime.decide(req("/", host="b.internal"), "2").allow
    assert runtime.decide(req("/", host="a.internal"), "3").reason is Reason.BUDGET_EXHAUSTED


def test_overlapping_rules_fall_through_to_one_with_budget(tmp_path: Path) -> None:
    rules = [
        {
            "name": "narrow",
            "host": API_HOST,
            "methods": ["GET"],
            "paths": ["/v1/items/*"],
            "max_calls": 1,
            "scope": "n",
        },
        {"name": "wide", "host": API_HOST, "methods": ["GET"], "paths": ["*"], "max_calls": 1, "scope": "w"},
    ]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    assert runtime.decide(req(), "1").rule == "narrow"
    assert runtime.decide(req(), "2").rule == "wide"
    assert runtime.decide(req(), "3").reason is Reason.BUDGET_EXHAUSTED


def test_budget_survives_reload_keyed_by_rule(tmp_path: Path) -> None:
    rules = [{"name": "r", "host": API_HOST, "methods": ["GET"], "paths": ["*"], "max_calls": 2}]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    assert runtime.decide(req(), "1").allow
    rules[0]["max_calls"] = 3
    write_config(tmp_path, base_config(tmp_path, [task(egress=rules)]))
    assert runtime.reload()
    assert runtime.decide(req(), "2").allow
    assert runtime.decide(req(), "3").allow
    assert runtime.decide(req(), "4").reason is Reason.BUDGET_EXHAUSTED


def test_several_tasks(tmp_path: Path) -> None:
    a = task("a", egress=[{"name": "a", "host": "a.internal", "methods": ["GET"], "paths": ["*"]}])
    b = task("b", egress=[{"name": "b", "host": "b.internal", "methods": ["GET"], "paths": ["*"]}])
    both = task("c", egress=[{"name": "c", "host": "a.internal", "methods": ["GET"], "paths": ["/shared"]}])
    runtime = make_runtime(tmp_path, [a, b, both])
    assert runtime.decide(req("/x", host="b.internal"), "1").task_id == "b"  # exactly one task allows it
    assert runtime.decide(req("/shared", host="a.internal"), "2").reason is Reason.TASK_AMBIGUOUS
    assert runtime.decide(req("/shared", host="a.internal", x_agent_task="c"), "3").task_id == "c"
    denied = runtime.decide(req("/x", host="b.internal", method="POST"), "4")
    assert denied.reason is Reason.METHOD_NOT_ALLOWED and denied.task_id == "b"  # deepest failure explains
    assert runtime.decide(req("/x", host="z.internal"), "5").reason is Reason.HOST_NOT_ALLOWED


def test_credential_is_injected_and_agent_authorization_removed(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "k").write_text("sk-live-123\n")
    rules = [
        {
            "name": "paid",
            "host": "paid.example",
            "methods": ["POST"],
            "paths": ["/v1/go"],
            "token": False,
            "credential": {"header": "X-Api-Key", "file": "secrets/k"},
        }
    ]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    decision = runtime.decide(req("/v1/go", "POST", "paid.example", authorization="Bearer mine"), "d")
    assert decision.allow and decision.token is None
    assert dict(decision.headers_to_set)["x-api-key"] == "sk-live-123"
    assert "authorization" in decision.headers_to_remove
    assert "sk-live-123" not in repr(runtime.snapshot.policy)


def test_credential_in_authorization_header(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("sk-abc")
    rules = [
        {
            "host": "paid.example",
            "methods": ["GET"],
            "paths": ["*"],
            "token": False,
            "credential": {"header": "Authorization", "file": "k", "prefix": "Bearer "},
        }
    ]
    runtime = make_runtime(tmp_path, [task(egress=rules)])
    decision = runtime.decide(req("/", host="paid.example", authorization="Bearer agents-own"), "d")
    assert dict(decision.headers_to_set)["authorization"] == "Bearer sk-abc"
    assert "authorization" not in decision.headers_to_remove


@pytest.mark.parametrize("content", [b"", b"line1\nline2", b"\xff\xfe", b"a\x00b"])
def test_bad_credential_files_are_config_errors(tmp_path: Path, content: bytes) -> None:
    from sidecar.errors import ConfigError

    (tmp_path / "k").write_bytes(content)
    rules = [{"host": "p.example", "methods": ["GET"], "paths": ["*"], "credential": {"header": "x-k", "file": "k"}}]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.egress\[0\]\.credential\.file"):
        make_runtime(tmp_path, [task(egress=rules)])


def test_invalid_reload_keeps_previous_config(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    before = runtime.snapshot
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    assert not runtime.reload()
    assert runtime.snapshot is before and runtime.reload_failures == 1
    assert runtime.last_error is not None and "invalid YAML" in runtime.last_error
    assert runtime.decide(req(), "d").allow


def test_unchanged_reload_is_a_no_op(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    before = runtime.snapshot
    assert not runtime.reload()
    assert runtime.snapshot is before


def test_key_rotation_keeps_old_key_published(tmp_path: Path) -> None:
    clock = Clock()
    runtime = make_runtime(tmp_path, [task()], clock)
    old_kid = runtime.snapshot.keys.current.kid
    next_kid = runtime.snapshot.keys.next.kid  # type: ignore[union-attr]
    assert [k["kid"] for k in runtime.jwks()["keys"]] == [old_kid, next_kid]
    (tmp_path / "keys" / "signing.pem").write_bytes((tmp_path / "keys" / "next.pem").read_bytes())
    assert runtime.reload()
    assert runtime.snapshot.keys.current.kid == next_kid
    assert old_kid in [k["kid"] for k in runtime.jwks()["keys"]]
    clock.now += 301  # max_token_ttl: tokens of the old key have expired
    assert old_kid not in [k["kid"] for k in runtime.jwks()["keys"]]
    json.dumps(runtime.jwks())


def test_ingress_is_denied_until_configured(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    ingress = AuthzRequest(Direction.INGRESS, "GET", "http", "agent", "/", {})
    assert not runtime.decide(ingress, "d").allow


def test_reload_back_to_an_earlier_file_after_a_failure(tmp_path: Path) -> None:
    """The unchanged-files shortcut must not hide a return to earlier content."""
    runtime = make_runtime(tmp_path, [task()])
    original = (tmp_path / "sidecar.yaml").read_text()
    wider = [{"name": "all", "host": API_HOST, "methods": ["GET"], "paths": ["*"]}]
    write_config(tmp_path, base_config(tmp_path, [task(egress=wider)]))
    assert runtime.reload() and runtime.decide(req("/v1/other"), "a").allow
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    assert not runtime.reload()
    (tmp_path / "sidecar.yaml").write_text(original)
    assert runtime.reload()
    assert runtime.decide(req("/v1/other"), "b").reason is Reason.PATH_NOT_ALLOWED
    assert not runtime.reload()  # nothing changed since: no rebuild


def test_task_files_from_annotations(tmp_path: Path) -> None:
    """A pod annotation mounted as a file: a plain task document, revoked through a second file."""
    write_keys(tmp_path)
    config = base_config(tmp_path, [])
    config["task_files"] = [{"path": "pod/task", "revoked": "pod/revoked"}]
    write_config(tmp_path, config)
    (tmp_path / "pod").mkdir()
    runtime = Runtime(tmp_path / "sidecar.yaml", clock=Clock())
    assert runtime.decide(req(), "a").reason is Reason.NO_TASK  # missing annotation: no task
    (tmp_path / "pod" / "task").write_text(
        "id: from-annotation\npurpose: p\nttl: 1h\n"
        "egress: [{host: api.internal, methods: [GET], paths: ['/v1/items/*']}]\n"
    )
    (tmp_path / "pod" / "revoked").write_text("")
    assert runtime.reload()
    decision = runtime.decide(req(), "b")
    assert decision.allow and decision.task_id == "from-annotation"
    (tmp_path / "pod" / "revoked").write_text("true")
    assert runtime.reload()
    assert runtime.decide(req(), "c").reason is Reason.TASK_REVOKED
    (tmp_path / "pod" / "task").write_text("id: [not a task")
    assert not runtime.reload() and "task_files[0].path" in (runtime.last_error or "")


# -- what an allow may carry: reserved headers, Envoy's header limits -----------------------------------
def test_reserved_headers_the_agent_forges_are_removed(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    forged = {"x-agent-authz-caller": "spiffe://test.example/ns/admin/sa/root", "x-agent-authz-decision-id": "x"}
    decision = runtime.decide(
        req(**{k.replace("-", "_"): v for k, v in {**forged, "x-agent-authz-zz": "1"}.items()}), "d"
    )
    assert decision.allow
    assert {"x-agent-authz-caller", "x-agent-authz-zz"} <= set(decision.headers_to_remove)
    assert dict(decision.headers_to_set)["x-agent-authz-decision-id"] == "d"  # overwritten, not removed
    assert "x-agent-authz-decision-id" not in decision.headers_to_remove


def test_dry_run_also_removes_forged_reserved_headers(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    config["dry_run"] = True
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml")
    decision = runtime.decide(req("/v1/admin", x_agent_authz_caller="spiffe://forged/x"), "d")
    assert decision.allow and decision.reason is Reason.DRY_RUN
    assert "x-agent-authz-caller" in decision.headers_to_remove


def test_an_allow_envoy_could_not_deliver_is_a_431_and_spends_no_budget(tmp_path: Path) -> None:
    """60 KiB of headers in all is Envoy's limit after the token is added: just under it with the token is
    allowed, just over it is denied (and the call's budget is given back)."""
    runtime = make_runtime(tmp_path, [task(max_calls=5)])
    probe = runtime.decide(req(), "d0")
    token_bytes = sum(len(k) + len(v) for k, v in probe.headers_to_set)
    base = req()
    fixed = sum(len(k) + len(v) for k, v in base.headers.items())  # none: the CheckRequest here has no headers
    room = 60 * 1024 - token_bytes - fixed - len("x-filler")
    fits = runtime.decide(req(x_filler="f" * room), "d1")
    assert fits.allow, fits.detail
    over = runtime.decide(req(x_filler="f" * (room + 1)), "d2")
    assert (over.allow, over.reason, over.http_status) == (False, Reason.HEADERS_TOO_LARGE, 431)
    assert "61441 bytes" in over.detail and over.token is None
    assert runtime.budgets.used(("t1", "")) == 2  # d0 and d1; d2 was given back
    many = runtime.decide(req(**{f"x_h{i}": "v" for i in range(99)}), "d3")
    assert many.reason is Reason.HEADERS_TOO_LARGE and "headers" in many.detail


@pytest.mark.parametrize(
    ("rule", "task_extra", "field"),
    [
        ({"scope": " ".join(["items:read"] * 900)}, {}, "tasks[0].egress[0].scope"),
        ({"audience": "https://" + "a" * 9000}, {}, "tasks[0].egress[0].audience"),
        ({}, {"on_behalf_of": None}, None),  # fits
        ({"host": "*.example.com", "scope": "s" * 5800}, {}, "tasks[0].egress[0].scope"),
    ],
)
def test_a_rule_whose_token_could_exceed_the_cap_is_a_config_error(
    tmp_path: Path, rule: dict[str, object], task_extra: dict[str, object], field: str | None
) -> None:
    spec = task(egress=[{"name": "r", "host": API_HOST, "methods": ["GET"], "paths": ["*"], **rule}], **task_extra)
    write_keys(tmp_path)
    write_config(tmp_path, base_config(tmp_path, [spec]))
    if field is None:
        Runtime(tmp_path / "sidecar.yaml")
        return
    with pytest.raises(ConfigError) as info:
        Runtime(tmp_path / "sidecar.yaml")
    assert info.value.field == field and "issuer.max_token_size (8192)" in info.value.reason


def test_on_behalf_of_is_named_when_it_is_the_largest_claim(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task(on_behalf_of="u" * 500)])
    config["issuer"]["max_token_size"] = "1KiB"
    write_config(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        Runtime(tmp_path / "sidecar.yaml")
    assert info.value.field == "tasks[0].on_behalf_of"


def test_a_reload_over_the_cap_keeps_the_last_good_config(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    config = base_config(
        tmp_path, [task(egress=[{"host": API_HOST, "methods": ["GET"], "paths": ["*"], "scope": "s" * 9000}])]
    )
    write_config(tmp_path, config)
    assert runtime.reload() is False and runtime.last_error is not None and "max_token_size" in runtime.last_error
    assert runtime.decide(req(), "d").allow


def test_a_refund_is_durable_first() -> None:
    """With a journal (the durable state), a given-back call is written before memory changes; a journal
    that fails keeps the call spent."""
    from sidecar.errors import StateError
    from sidecar.policy.budget import BudgetLedger

    class Journal:
        def __init__(self) -> None:
            self.saved: list[dict[tuple[str, str], int]] = []
            self.fail = False

        def save_counters(self, counters: dict[tuple[str, str], int]) -> None:
            if self.fail:
                raise StateError("state.db", "disk full")
            self.saved.append(dict(counters))

    journal = Journal()
    ledger = BudgetLedger(journal=journal)
    limits = ((("t", ""), 3), (("t", "r"), None))
    assert ledger.try_consume(limits) and ledger.try_consume(limits)
    ledger.refund(limits)
    assert journal.saved[-1] == {("t", ""): 1} and ledger.used(("t", "")) == 1 and ledger.used(("t", "r")) == 1
    journal.fail = True
    with pytest.raises(StateError):
        ledger.refund(limits)
    assert ledger.used(("t", "")) == 1
