"""Delegation end to end inside two runtimes: issue, verify, enforce, act chains, revocation, refusals."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.decision import AuthzRequest, Direction, Reason
from sidecar.errors import ConfigError
from sidecar.grants import codec
from sidecar.grants.issue import DelegationRequest
from sidecar.grants.model import GRANT_TYP, GrantError
from sidecar.grants.revocations import sign_revocations
from sidecar.identity.devca import DevCA
from sidecar.runtime import Runtime, TaskService
from tests.support.grants_env import ORCH, OTHER, ROOT_TASK, SUB, TD, USER, Scenario


@pytest.fixture
def sc(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path)


def orchestrator(sc: Scenario, **opts: Any) -> TaskService:
    return TaskService(Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True, **opts)))


def sub_agent(sc: Scenario, name: str = "sub", spiffe_id: str = SUB, **opts: Any) -> TaskService:
    revocations = [sc.root / "orch" / "revocations.jwt", sc.root / "issuer" / "revocations.jwt"]
    return TaskService(Runtime(sc.agent_config(name, spiffe_id, sc.root, revocations=revocations, **opts)))


def delegation(**kw: Any) -> DelegationRequest:
    body: dict[str, Any] = {
        "subject": SUB,
        "ttl": "10m",
        "name": "market",
        "max_calls": 10,
        "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/ACME/*"], "max_calls": 3}],
    }
    body.update(kw)
    return DelegationRequest.model_validate(body)


def egress(host: str, path: str, method: str = "GET") -> AuthzRequest:
    return AuthzRequest(Direction.EGRESS, method, "http", host, path, {})


def claims(decision: Any) -> dict[str, Any]:
    token = dict(decision.headers_to_set)["authorization"].removeprefix("Bearer ")
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_root_grant_is_enforced_with_its_txn_and_actor(sc: Scenario) -> None:
    orch = orchestrator(sc)
    task = orch.runtime.snapshot.policy.tasks_by_id["q3"]
    assert task.grant is not None and task.grant.depth == 0 and task.txn == "q3"
    decision = orch.runtime.decide(egress("market.internal", "/v1/prices/X"), "d")
    assert decision.allow
    c = claims(decision)
    assert (c["sub"], c["act"], c["txn"]) == (USER, {"sub": ORCH}, "q3")


def test_delegation_end_to_end(sc: Scenario) -> None:
    orch = orchestrator(sc)
    token, child = orch.delegate("q3", delegation())
    assert child.id == "q3/market" and child.on_behalf_of == USER
    header = jwt.get_unverified_header(token)
    assert header["typ"] == GRANT_TYP and "x5c" in header
    # the budget given away is reserved from the parent
    assert orch.runtime.budgets.used(("q3", "")) == 10 and orch.runtime.budgets.used(("q3", "prices")) == 3

    sub = sub_agent(sc)
    grant = sub.accept(token)
    assert grant.ancestors == ("q3",) and grant.signer == ORCH
    allowed = sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/history"), "a")
    assert allowed.allow and allowed.act_chain == (SUB, ORCH) and allowed.txn == "q3"
    c = claims(allowed)
    assert c["act"] == {"sub": SUB, "act": {"sub": ORCH}}  # current actor outermost (RFC 8693 §4.1)
    assert c["txn"] == "q3" and c["sub"] == USER and c["scope"] == "prices:read tables:read"
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/OTHER/x"), "b").reason is Reason.PATH_NOT_ALLOWED
    assert sub.runtime.decide(egress("sales.internal", "/v1/sales/q3"), "c").reason is Reason.HOST_NOT_ALLOWED
    for i in range(2):
        assert sub.runtime.decide(egress("market.internal", f"/v1/prices/ACME/{i}"), str(i)).allow
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/3"), "z").reason is Reason.BUDGET_EXHAUSTED


def test_credential_delegation(sc: Scenario) -> None:
    orch = orchestrator(sc)
    rules = [
        {
            "host": "sentiment.example.com",
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
            "max_calls": 2,
        }
    ]
    token, _ = orch.delegate("q3", delegation(egress=rules))
    sub = sub_agent(sc)
    sub.accept(token)
    decision = sub.runtime.decide(egress("sentiment.example.com", "/v1/analyze", "POST"), "d")
    assert decision.allow and dict(decision.headers_to_set)["x-api-key"] == "sk-test-sentiment"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"egress": [{"host": "market.internal", "methods": ["DELETE"], "paths": ["/v1/prices/*"], "max_calls": 1}]},
            "egress[0].methods",
        ),
        (
            {"egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/*"], "max_calls": 1}]},
            "egress[0].paths",
        ),
        (
            {"egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/*"]}]},
            "egress[0].max_calls",
        ),
        (
            {"egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/*"], "max_calls": 51}]},
            "egress[0].max_calls",
        ),
        ({"max_calls": None}, "max_calls"),
        ({"max_calls": 101}, "max_calls"),
        ({"egress": [{"host": "evil.example", "methods": ["GET"], "paths": ["*"]}]}, "egress[0].host"),
    ],
)
def test_widening_delegations_are_refused_and_named(sc: Scenario, change: dict[str, Any], field: str) -> None:
    orch = orchestrator(sc)
    with pytest.raises(GrantError) as info:
        orch.delegate("q3", delegation(**change))
    assert info.value.detail == "grant_widening"
    assert field in str(info.value)
    assert orch.runtime.budgets.used(("q3", "")) == 0  # nothing reserved by a refused delegation


def test_ttl_beyond_parent(sc: Scenario) -> None:
    with pytest.raises(GrantError, match="outlive"):
        orchestrator(sc).delegate("q3", delegation(ttl="2h"))


def test_budget_exceeding_what_is_left(sc: Scenario) -> None:
    orch = orchestrator(sc)
    orch.delegate(
        "q3",
        delegation(
            name="one",
            max_calls=60,
            egress=[{"host": "sales.internal", "methods": ["GET"], "paths": ["/v1/sales/*"]}],
        ),
    )
    with pytest.raises(GrantError, match="max_calls"):
        orch.delegate("q3", delegation(name="two", max_calls=50))


def test_depth_overflow(sc: Scenario) -> None:
    orch = orchestrator(sc, max_depth=1)
    token, _ = orch.delegate("q3", delegation())
    sub = sub_agent(sc, max_depth=1)
    sub.accept(token)
    with pytest.raises(GrantError) as info:
        sub.delegate("q3/market", delegation(subject=OTHER, name="deeper", max_calls=1))
    assert "max_depth" in str(info.value)
    # and a verifier with a smaller max_depth refuses the chain outright
    strict = sub_agent(sc, name="strict", max_depth=0)
    with pytest.raises(GrantError, match="grant_too_deep"):
        strict.accept(token)


def test_grant_replayed_by_another_agent(sc: Scenario) -> None:
    token, _ = orchestrator(sc).delegate("q3", delegation())
    other = sub_agent(sc, name="other", spiffe_id=OTHER)
    with pytest.raises(GrantError, match="grant_wrong_subject"):
        other.accept(token)


def test_forged_signature(sc: Scenario) -> None:
    token, _ = orchestrator(sc).delegate("q3", delegation())
    head, body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["task"]["egress"][0]["paths"] = ["/v1/prices/*"]  # quietly widen what was signed
    forged_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(GrantError, match="grant_bad_signature"):
        sub_agent(sc).accept(f"{head}.{forged_body}.{sig}")


def hand_made_child(parent_token: str, *, issuer: str, jti: str) -> dict[str, Any]:
    """A well-formed, narrower sub-grant payload of q3 for SUB, to be signed by whatever a test picks."""
    now = int(time.time())
    return {
        "iss": issuer,
        "sub": SUB,
        "jti": jti,
        "txn": "q3",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "ancestors": ["q3"],
        "parent": parent_token,
        "task": {
            "purpose": "p",
            "on_behalf_of": USER,
            "max_calls": 1,
            "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/*"], "max_calls": 1}],
        },
    }


def test_x5c_chain_from_another_trust_domain(sc: Scenario) -> None:
    orch = orchestrator(sc)
    parent = orch.runtime.snapshot.policy.tasks_by_id["q3"].grant
    assert parent is not None
    rogue = DevCA.create("rogue.example")  # a CA that is not in anyone's bundles
    chain, key = rogue.issue_x509("spiffe://rogue.example/ns/finance/sa/orchestrator")
    payload = hand_made_child(parent.token, issuer=ORCH, jti="q3/rogue")
    token = codec.sign(payload, key, typ=GRANT_TYP, x5c=chain)
    with pytest.raises(GrantError, match="grant_untrusted_signer"):
        sub_agent(sc).accept(token)


def test_signed_by_someone_other_than_the_parent(sc: Scenario) -> None:
    orch = orchestrator(sc)
    parent = orch.runtime.snapshot.policy.tasks_by_id["q3"].grant
    assert parent is not None
    chain, key = sc.ca.issue_x509(OTHER)  # a valid SVID of the same trust domain, but not the parent's subject
    payload = hand_made_child(parent.token, issuer=OTHER, jti="q3/x")
    with pytest.raises(GrantError, match="grant_wrong_signer"):
        sub_agent(sc).accept(codec.sign(payload, key, typ=GRANT_TYP, x5c=chain))


def test_expired_parent(sc: Scenario) -> None:
    old = dict(ROOT_TASK, ttl="60s")
    expired_root = sc.root_grant(old, now=time.time() - 3600)
    orch = TaskService(Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[expired_root], publish=True)))
    assert orch.runtime.decide(egress("market.internal", "/v1/prices/X"), "d").reason is Reason.TASK_EXPIRED
    with pytest.raises(GrantError, match="not currently valid"):
        orch.delegate("q3", delegation())


def test_root_grant_from_an_unknown_issuer(sc: Scenario) -> None:
    other = Scenario(sc.root / "elsewhere")
    with pytest.raises(ConfigError, match="grant_untrusted_signer"):
        Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[other.root_grant()]))


def test_revocation_by_the_issuing_sidecar_cascades(sc: Scenario) -> None:
    orch = orchestrator(sc)
    token, _ = orch.delegate("q3", delegation())
    sub = sub_agent(sc)
    sub.accept(token)
    deeper_token, _ = sub.delegate(
        "q3/market",
        delegation(
            subject=OTHER,
            name="deeper",
            ttl="5m",  # shorter than its 10 m parent: the same ttl would outlive it once a second boundary passes
            max_calls=1,
            egress=[{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/ACME/*"], "max_calls": 1}],
        ),
    )
    deeper = sub_agent(sc, name="deeper", spiffe_id=OTHER)
    deeper.accept(deeper_token)
    assert deeper.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "d").allow

    published = orch.revoke("q3/market")
    assert published is not None and (sc.root / "orch" / "revocations.jwt").read_text().strip() == published
    for agent in (sub, deeper):
        assert agent.runtime.reload()
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "a").reason is Reason.TASK_REVOKED
    assert deeper.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "b").reason is Reason.TASK_REVOKED
    assert orch.runtime.decide(egress("market.internal", "/v1/prices/X"), "c").allow  # the parent is untouched


def test_root_revocation_list_revokes_everything_below(sc: Scenario, tmp_path: Path) -> None:
    orch = orchestrator(sc)
    token, _ = orch.delegate("q3", delegation())
    sub = sub_agent(sc)
    sub.accept(token)
    revocations = sign_revocations(
        ["q3"], sc.issuer.private_key, issuer="admin", issued_at=int(time.time()), kid=sc.issuer.kid
    )
    (sc.root / "issuer" / "revocations.jwt").write_text(revocations)
    assert sub.runtime.reload()
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "d").reason is Reason.TASK_REVOKED


def test_revocation_without_authority_is_ignored(sc: Scenario) -> None:
    orch = orchestrator(sc)
    token, _ = orch.delegate("q3", delegation())
    sub = sub_agent(sc)
    sub.accept(token)
    # OTHER never granted anything in this chain: its list must not revoke q3/market
    chain, key = sc.ca.issue_x509(OTHER)
    forged = sign_revocations(["q3", "q3/market"], key, issuer=OTHER, issued_at=int(time.time()), x5c=chain)
    (sc.root / "issuer" / "revocations.jwt").write_text(forged)
    sub.runtime.reload()
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "d").allow


def test_invalid_revocation_list_keeps_last_good_config(sc: Scenario) -> None:
    sub = sub_agent(sc)
    (sc.root / "issuer" / "revocations.jwt").write_text("garbage.not.jws")
    assert not sub.runtime.reload()
    assert sub.runtime.last_error is not None and "grants.revocations[1]" in sub.runtime.last_error


def test_task_api_errors(sc: Scenario) -> None:
    orch = orchestrator(sc)
    with pytest.raises(GrantError, match="grant_unknown_task"):
        orch.delegate("nope", delegation())
    with pytest.raises(GrantError, match="grant_unknown_task"):
        orch.revoke("nope")
    with pytest.raises(GrantError, match="grant_malformed"):
        sub_agent(sc).accept("a.b.c")
    token, _ = orch.delegate("q3", delegation())
    sub = sub_agent(sc)
    sub.accept(token)
    with pytest.raises(GrantError, match="grant_duplicate"):
        sub.accept(token)


def test_grant_claiming_an_unknown_credential(sc: Scenario) -> None:
    orch = orchestrator(sc)
    rules = [
        {
            "host": "sentiment.example.com",
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
            "max_calls": 1,
        }
    ]
    token, _ = orch.delegate("q3", delegation(egress=rules))
    config = sc.agent_config("nocred", SUB, sc.root)
    text = config.read_text().replace("sentiment:", "other-key:")
    config.write_text(text)
    with pytest.raises(GrantError, match="grant_unknown_credential"):
        TaskService(Runtime(config)).accept(token)


def test_config_tasks_cannot_be_delegated(sc: Scenario, tmp_path: Path) -> None:
    from tests.support.config import task as config_task

    path = sc.agent_config("plain", ORCH, sc.root)
    data = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    data["tasks"] = [config_task("local", agent=ORCH)]
    path.write_text(__import__("yaml").safe_dump(data))
    with pytest.raises(GrantError, match="grant_not_delegable"):
        TaskService(Runtime(path)).delegate("local", delegation())


def test_bundle_trust_domain_name(sc: Scenario) -> None:
    assert TD == "test.example"
