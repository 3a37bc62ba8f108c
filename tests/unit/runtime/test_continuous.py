"""Continuous verification in the runtime: the anomaly rule (and its dry run), freezes on every
kind of call, sensitivity, approvals without a body to bind, what is left, the answers' shape and
the durable tables."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.config.schema import EgressRuleSpec, TaskSpec
from sidecar.control.approvals import Approval, ApprovalState
from sidecar.control.documents import Action, ActionKind, Target
from sidecar.control.quarantine import Strike
from sidecar.decision import AuthzRequest, Decision, Direction, Protocol, Reason
from sidecar.envoy_authz.translate import build_check_response
from sidecar.grants.attenuation import AttenuationError, check_attenuation
from sidecar.policy.gates import CallBinding
from sidecar.runtime.active import Runtime
from sidecar.state import StateStore
from tests.support.config import AGENT, API_HOST, base_config, task, write_config, write_keys
from tests.support.runtime import Clock, claims_of, req

READ = {"name": "read", "host": API_HOST, "methods": ["GET"], "paths": ["/v1/items/*"], "max_calls": 3}
POST = {"name": "post", "host": API_HOST, "methods": ["POST"], "paths": ["/v1/items/*"], "approval": "required"}
TLS = {"name": "tls", "host": "secure.example.com", "tls": "passthrough"}


def runtime(tmp_path: Path, tasks: list[dict[str, Any]], clock: Clock | None = None, **sections: Any) -> Runtime:
    write_keys(tmp_path)
    config = base_config(tmp_path, tasks)
    config.update(sections)
    write_config(tmp_path, config)
    return Runtime(tmp_path / "sidecar.yaml", clock=clock or Clock())


def probe(rt: Runtime, n: int) -> list[Decision]:
    return [rt.decide(req(f"/v2/{i}"), f"p{n}-{i}") for i in range(n)]


@pytest.mark.parametrize("mode", ["quarantine", "sidecar"])
def test_dry_run_records_would_quarantine_and_freezes_nothing(tmp_path: Path, mode: str) -> None:
    sections: dict[str, Any] = {"quarantine": {"threshold": 2, "dry_run": mode == "quarantine"}}
    if mode == "sidecar":
        sections["dry_run"] = True
    rt = runtime(tmp_path, [task("t1", egress=[READ])], **sections)
    first, second = probe(rt, 2)
    assert not first.followups
    (would,) = second.followups
    assert would.reason is Reason.WOULD_QUARANTINE and would.direction is Direction.CONTROL
    assert would.action is not None and would.action["evidence"] == ["p2-0", "p2-1"]
    assert rt.blocks == {} and rt.quarantines["dry_run"] == 1
    assert rt.decide(req(), "ok").reason in (Reason.ALLOWED, Reason.DRY_RUN)


def test_budgets_and_expiry_never_count_and_a_freeze_stops_connections_too(tmp_path: Path) -> None:
    clock = Clock()
    rt = runtime(tmp_path, [task("t1", egress=[READ, TLS])], clock, quarantine={"threshold": 2, "window": "1m"})
    allowed = [rt.decide(req(), f"a{i}") for i in range(3)]
    assert [d.remaining for d in allowed] == [2, 1, 0]
    spent = [rt.decide(req(), f"b{i}") for i in range(4)]
    assert {d.reason for d in spent} == {Reason.BUDGET_EXHAUSTED} and {d.remaining for d in spent} == {0}
    assert rt.blocks == {}
    connection = AuthzRequest(
        Direction.EGRESS,
        "",
        "",
        "",
        "",
        {},
        protocol=Protocol.TLS,
        sni="secure.example.com",
        destination="10.0.0.9:443",
    )
    rt.addresses.remember("secure.example.com", [(ip_address("10.0.0.9"), 300)], clock.now)  # the agent resolved it
    assert rt.decide(connection, "c1").reason is Reason.ALLOWED
    frozen = probe(rt, 2)[-1]
    assert [f.reason for f in frozen.followups] == [Reason.TASK_FROZEN]
    assert rt.decide(connection, "c2").reason is Reason.TASK_QUARANTINED
    assert rt.decide(req("/v2/again"), "x").reason is Reason.TASK_QUARANTINED and not rt.strikes.strikes("t1")


def test_another_agents_task_never_counts(tmp_path: Path) -> None:
    other = task("t2", agent="spiffe://test.example/ns/agents/sa/other")
    rt = runtime(tmp_path, [task("t1", egress=[READ]), other], quarantine={"threshold": 1})
    named = rt.decide(req(x_agent_task="t2"), "d")
    assert named.reason is Reason.TASK_NOT_FOR_AGENT and not named.followups and rt.blocks == {}


def test_names_no_task_allows_count_against_the_agents_active_tasks(tmp_path: Path) -> None:
    """A DNS query carries no task id: a refused name counts against every active task of the agent
    (one task: the record names it); a name its own expired task names counts against nothing."""
    clock = Clock()
    late = task(
        "late", egress=[{"name": "other", "host": "late.example.com", "methods": ["GET"], "paths": ["/*"]}], ttl="1m"
    )
    rt = runtime(tmp_path, [task("t1", egress=[READ]), late], clock, quarantine={"threshold": 2, "window": "1m"})
    clock.now += 120  # "late" expired: its name is refused, and says nothing about t1
    expired = rt.decide_dns("late.example.com", "A", "", "e1")
    assert (expired.reason, expired.task_id, expired.followups) == (Reason.DNS_NOT_ALLOWED, "late", ())
    first = rt.decide_dns("c2VjcmV0.exfil.example", "TXT", "", "d1")
    assert (first.reason, first.task_id, first.followups) == (Reason.DNS_NOT_ALLOWED, "t1", ())
    assert rt.decide_dns(API_HOST, "A", "", "ok").allow  # allowed names never count
    second = rt.decide_dns("cGFzc3dvcmQ.exfil.example", "TXT", "", "d2")
    (frozen,) = second.followups
    assert frozen.reason is Reason.TASK_FROZEN and frozen.action is not None
    assert frozen.action["evidence"] == ["d1", "d2"]
    assert rt.decide(req(), "after").reason is Reason.TASK_QUARANTINED
    assert rt.decide_dns(API_HOST, "A", "", "after-dns").reason is Reason.DNS_NOT_ALLOWED  # frozen: no names


def test_a_refused_name_counts_against_each_of_several_active_tasks(tmp_path: Path) -> None:
    other = {"name": "other", "host": "other.example.com", "methods": ["GET"], "paths": ["/*"]}
    rt = runtime(tmp_path, [task("t1", egress=[READ]), task("t2", egress=[other])], quarantine={"threshold": 1})
    refused = rt.decide_dns("leak.attacker.example", "A", "", "d1")
    assert refused.task_id is None  # the record names no task of the two
    assert sorted(f.task_id or "" for f in refused.followups) == ["t1", "t2"]
    assert set(rt.blocks) == {"t1", "t2"}


def test_a_probe_judged_against_no_task_counts_against_each_active_task(tmp_path: Path) -> None:
    """A host no task names while the agent holds two tasks, and a CONNECT to an outside host, are
    judged against no task: they count against each active task of the agent all the same."""
    other = {"name": "other", "host": "other.example.com", "methods": ["GET"], "paths": ["/*"]}
    rt = runtime(tmp_path, [task("t1", egress=[READ]), task("t2", egress=[other])], quarantine={"threshold": 2})
    first = rt.decide(req("/exfiltrate", host="evil.example.com"), "h1")
    assert (first.reason, first.task_id, first.followups) == (Reason.HOST_NOT_ALLOWED, None, ())
    tunnel = rt.decide(req("", method="CONNECT", host="evil.example.com:443"), "c1")
    assert tunnel.reason is Reason.HOST_NOT_ALLOWED and tunnel.task_id is None
    assert sorted(f.task_id or "" for f in tunnel.followups) == ["t1", "t2"]
    assert set(rt.blocks) == {"t1", "t2"}


def test_a_connect_probe_of_a_single_task_names_and_counts_against_it(tmp_path: Path) -> None:
    rt = runtime(tmp_path, [task("t1", egress=[READ])], quarantine={"threshold": 2})
    probes = [rt.decide(req("", method="CONNECT", host=f"evil{i}.example.com:443"), f"c{i}") for i in range(2)]
    assert [(p.reason, p.task_id) for p in probes] == [(Reason.HOST_NOT_ALLOWED, "t1")] * 2
    assert [f.reason for f in probes[1].followups] == [Reason.TASK_FROZEN]
    assert rt.decide(req(), "after").reason is Reason.TASK_QUARANTINED


def test_a_search_list_expansion_of_an_allowed_name_never_counts(tmp_path: Path) -> None:
    """``ndots:5`` and a search domain make every lookup of ``api.example.com`` ask
    ``api.example.com.corp.example`` first: refused, recorded, never a strike."""
    rt = runtime(tmp_path, [task("t1", egress=[READ])], dns={"allow": ["*.cluster.local"]}, quarantine={"threshold": 1})
    for name in (f"{API_HOST}.corp.example", f"{API_HOST}.us-west-2.compute.internal", "x.svc.cluster.local.corp"):
        refused = rt.decide_dns(name, "A", "", name)
        assert (refused.reason, refused.followups) == (Reason.DNS_NOT_ALLOWED, ()), name
    assert rt.blocks == {}
    probe = rt.decide_dns(f"data.{API_HOST}.evil.example", "A", "", "probe")  # the allowed name is not a prefix
    assert [f.reason for f in probe.followups] == [Reason.TASK_FROZEN]


def test_an_allowed_sni_to_another_address_counts(tmp_path: Path) -> None:
    rt = runtime(tmp_path, [task("t1", egress=[READ, TLS])], quarantine={"threshold": 2})
    connections = [
        AuthzRequest(
            Direction.EGRESS, "", "", "", "", {}, protocol=Protocol.TLS, sni="secure.example.com", destination=address
        )
        for address in ("10.66.0.1:443", "10.66.0.2:443")
    ]
    first, second = (rt.decide(c, f"m{i}") for i, c in enumerate(connections))
    assert (first.reason, first.task_id) == (Reason.DESTINATION_MISMATCH, "t1")
    assert [f.reason for f in second.followups] == [Reason.TASK_FROZEN]


def test_sensitivity_labels_from_rules_hosts_and_the_default(tmp_path: Path) -> None:
    rules = [
        {**READ, "max_calls": None},
        {"name": "hr", "host": "people.hr.internal", "methods": ["GET"], "paths": ["*"]},
        {"name": "pub", "host": "docs.hr.internal", "methods": ["GET"], "paths": ["*"], "sensitivity": "public"},
    ]
    sensitivity = {"hosts": {"*.hr.internal": "restricted", "docs.hr.internal": "public"}, "default": "public"}
    rt = runtime(tmp_path, [task("t1", egress=rules, max_sensitivity="confidential")], sensitivity=sensitivity)
    plain = rt.decide(req(), "a")
    assert (plain.reason, plain.sensitivity) == (Reason.ALLOWED, "public") and claims_of(rt, plain)[
        "sensitivity"
    ] == "public"
    hr = rt.decide(req("/x", host="people.hr.internal"), "b")
    assert (hr.reason, hr.sensitivity) == (Reason.SENSITIVITY_NOT_ALLOWED, "restricted")
    docs = rt.decide(req("/x", host="docs.hr.internal"), "c")  # the exact host entry beats the suffix
    assert (docs.reason, docs.sensitivity, docs.purpose) == (Reason.ALLOWED, "public", "test task")


def test_an_approval_never_binds_a_body_it_did_not_see(tmp_path: Path) -> None:
    rt = runtime(tmp_path, [task("t1", egress=[POST])])
    with_body = AuthzRequest(Direction.EGRESS, "POST", "http", API_HOST, "/v1/items/1", {"content-length": "12"})
    assert rt.decide(with_body, "a").reason is Reason.APPROVAL_BODY_UNAVAILABLE
    chunked = AuthzRequest(Direction.EGRESS, "POST", "http", API_HOST, "/v1/items/1", {"transfer-encoding": "chunked"})
    assert rt.decide(chunked, "b").reason is Reason.APPROVAL_BODY_UNAVAILABLE
    empty = AuthzRequest(Direction.EGRESS, "POST", "http", API_HOST, "/v1/items/1", {"content-length": "0"})
    waiting = rt.decide(empty, "c")
    assert waiting.reason is Reason.APPROVAL_REQUIRED and waiting.approval is not None
    buffered = AuthzRequest(Direction.EGRESS, "POST", "http", API_HOST, "/v1/items/1", {}, body=b'{"a":1}')
    other = rt.decide(buffered, "d")
    assert other.reason is Reason.APPROVAL_REQUIRED and other.approval["id"] != waiting.approval["id"]  # type: ignore[index]


def test_deny_bodies_and_the_remaining_header() -> None:
    def parsed(decision: Decision) -> Any:
        return external_auth_pb2.CheckResponse.FromString(build_check_response(decision))

    waiting = Decision(
        False, Reason.APPROVAL_REQUIRED, 403, "d1", approval={"id": "0123456789abcdef", "status": "pending"}
    )
    assert (
        parsed(waiting).denied_response.body
        == '{"decision_id":"d1","reason":"approval_required","approval_id":"0123456789abcdef"}'
    )
    spent = Decision(False, Reason.BUDGET_EXHAUSTED, 429, "d2", remaining=0)
    assert parsed(spent).denied_response.body == '{"decision_id":"d2","reason":"budget_exhausted","remaining":0}'
    allowed = Decision(True, Reason.ALLOWED, 200, "d3", remaining=4)
    headers = {h.header.key: h.header.value for h in parsed(allowed).ok_response.response_headers_to_add}
    assert headers["x-agent-authz-remaining"] == "4"
    rpc = Decision(
        False, Reason.APPROVAL_MISMATCH, 403, "d4", method="POST", rpc_protocol="mcp", rpc_id=3, approval={"id": "x"}
    )
    assert (
        '"approval_id":"x"' in parsed(rpc).denied_response.body
        and '"jsonrpc":"2.0"' in parsed(rpc).denied_response.body
    )


def test_the_new_fields_attenuate() -> None:
    def spec(**kw: Any) -> TaskSpec:
        rule = {"host": "a.x", "methods": ["GET"], "paths": ["*"], **kw.pop("rule", {})}
        return TaskSpec.model_validate({"id": "t", "agent": AGENT, "purpose": "p", "ttl": 60, "egress": [rule], **kw})

    def check(parent: TaskSpec, child: TaskSpec) -> None:
        check_attenuation(parent, child, parent_window=(0, 100), child_window=(0, 100))

    cases = [
        (spec(max_sensitivity="internal"), spec(), "max_sensitivity"),
        (spec(max_sensitivity="internal"), spec(max_sensitivity="restricted"), "max_sensitivity"),
        (spec(quarantine={"threshold": 3}), spec(), "quarantine"),
        (spec(quarantine={"threshold": 3}), spec(quarantine={"threshold": 4}), "quarantine"),
        (
            spec(quarantine={"threshold": 3, "window": 60}),
            spec(quarantine={"threshold": 3, "window": 30}),
            "quarantine",
        ),
        (spec(rule={"sensitivity": "confidential"}), spec(rule={"sensitivity": "internal"}), "egress[0].sensitivity"),
        (spec(rule={"approval": "required"}), spec(), "egress[0].approval"),
        (
            spec(rule={"approval": {"methods": ["GET"]}}),
            spec(rule={"approval": {"methods": ["POST"]}}),
            "egress[0].approval",
        ),
    ]
    for parent, child, field in cases:
        with pytest.raises(AttenuationError) as caught:
            check(parent, child)
        assert caught.value.field == field
    check(
        spec(max_sensitivity="internal", quarantine={"threshold": 3}),
        spec(max_sensitivity="public", quarantine={"threshold": 2}),
    )
    check(
        spec(rule={"approval": {"methods": ["GET"]}}), spec(rule={"approval": "required", "sensitivity": "restricted"})
    )
    with pytest.raises(ValueError, match=r"approval\.tools"):
        EgressRuleSpec.model_validate({"host": "a.x", "methods": ["GET"], "paths": ["*"], "approval": {"tools": ["x"]}})
    with pytest.raises(ValueError, match="passthrough"):
        EgressRuleSpec.model_validate({"host": "a.x", "tls": "passthrough", "approval": "required"})


def test_the_continuous_tables_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.db"
    store = StateStore.open(path)
    store.bind(AGENT)
    action = Action("0123456789abcdefghij", ActionKind.KILL, Target.parse(f"agent:{AGENT}"), 1.5, "key:k", True,
                    "why", ("d1", "d2"), "file:/x", "a.b.c")  # fmt: skip
    store.save_actions([action, action])
    store.save_strikes("t1", [Strike("d1", 1.0, "path_not_allowed"), Strike("d2", 2.0, "host_not_allowed")])
    call = CallBinding(AGENT, "t1", "h", 80, "DELETE", "/p", "q=1", "drop", "sha256:x", "v1", "sha256:h")
    approval = Approval("fedcba9876543210", call, ApprovalState.APPROVED, 1.0, 9.0, 2.0, "key:k")
    store.save_approvals([approval])
    store.close()
    again = StateStore.open(path)
    assert again.load_actions() == [action]
    assert again.load_strikes() == {
        "t1": [Strike("d1", 1.0, "path_not_allowed"), Strike("d2", 2.0, "host_not_allowed")]
    }
    assert again.load_approvals() == [approval]
    again.save_approvals([], dropped=[approval.id])
    again.save_strikes("t1", [])
    assert again.load_approvals() == [] and again.load_strikes() == {}
    again.close()
