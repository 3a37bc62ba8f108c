"""Approvals: waiting, granted, used once; replay, mismatch, expiry, policy change; the signed
documents that grant them; the anomaly rule's window."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.config.schema import ApprovalsSpec, QuarantineSpec
from sidecar.control.approvals import ApprovalBook, ApprovalState
from sidecar.control.documents import (
    ControlCode,
    ControlError,
    sign_approval,
    sign_operator_token,
    verify_approval,
    verify_operator_token,
)
from sidecar.control.quarantine import AnomalyDetector, effective_rule
from sidecar.decision import Reason
from sidecar.grants.verify import GrantVerifier
from sidecar.policy.gates import EMPTY_BODY, CallBinding, headers_digest
from sidecar.policy.model import QuarantineRule
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

AGENT = "spiffe://td/ns/a/sa/worker"
CALL = CallBinding(AGENT, "t1", "api.internal", 80, "DELETE", "/v1/items/1", "", "", "none", "v1")
END = 10_000.0


def book(**settings: object) -> ApprovalBook:
    return ApprovalBook(ApprovalsSpec.model_validate(settings))


def test_the_flow_waiting_approved_used_once_then_replayed() -> None:
    approvals = book()
    first = approvals.check(CALL, now=1, task_expires_at=END)
    assert first.reason is Reason.APPROVAL_REQUIRED and first.record["status"] == "pending"
    assert approvals.check(CALL, now=2, task_expires_at=END).approval_id == first.approval_id  # still waiting
    granted = approvals.approve(first.approval_id, by="key:k", ttl=60, now=3, task_expires_at=END)
    assert granted.state is ApprovalState.APPROVED and granted.expires_at == 63
    usable = approvals.check(CALL, now=4, task_expires_at=END)
    assert usable.reason is Reason.ALLOWED and usable.approval_id == first.approval_id
    assert approvals.consume(usable.approval_id, now=4, decision_id="d4")["status"] == "consumed"
    replay = approvals.check(CALL, now=5, task_expires_at=END)
    assert replay.reason is Reason.APPROVAL_REPLAYED and replay.approval_id != first.approval_id
    with pytest.raises(ControlError) as closed:
        approvals.approve(first.approval_id, by="key:k", ttl=60, now=6, task_expires_at=END)
    assert closed.value.detail is ControlCode.APPROVAL_CLOSED


def test_mismatch_expiry_and_policy_change() -> None:
    approvals = book()
    waiting = approvals.check(CALL, now=1, task_expires_at=END)
    approvals.approve(waiting.approval_id, by="key:k", ttl=10, now=1, task_expires_at=END)
    other = replace(CALL, content="sha256:other")
    assert approvals.check(other, now=2, task_expires_at=END).reason is Reason.APPROVAL_MISMATCH
    assert approvals.check(replace(CALL, query="id=2"), now=2, task_expires_at=END).reason is Reason.APPROVAL_MISMATCH
    assert (
        approvals.check(replace(CALL, path="/v1/other"), now=2, task_expires_at=END).reason is Reason.APPROVAL_REQUIRED
    )
    changed = replace(CALL, policy_version="v2")
    assert approvals.check(changed, now=3, task_expires_at=END).reason is Reason.APPROVAL_POLICY_CHANGED
    assert approvals.get(waiting.approval_id).state is ApprovalState.STALE  # type: ignore[union-attr]

    late = book()
    waiting = late.check(CALL, now=1, task_expires_at=END)
    late.approve(waiting.approval_id, by="key:k", ttl=10, now=1, task_expires_at=END)
    assert late.check(CALL, now=11, task_expires_at=END).reason is Reason.APPROVAL_EXPIRED


def test_ttl_is_capped_and_waiting_calls_are_bounded() -> None:
    approvals = book(max_ttl="1m", default_ttl="30s", max_pending=2, pending_ttl="5m")
    waiting = approvals.check(CALL, now=0, task_expires_at=END)
    assert approvals.approve(waiting.approval_id, by="k", ttl=3600, now=0, task_expires_at=END).expires_at == 60
    ids = [approvals.check(replace(CALL, path=f"/p{i}"), now=i, task_expires_at=END).approval_id for i in range(3)]
    assert approvals.get(ids[0]) is None and approvals.get(ids[2]) is not None  # the oldest waiting one went
    forgotten = approvals.check(replace(CALL, path="/late"), now=0, task_expires_at=END)
    with pytest.raises(ControlError) as caught:
        approvals.approve(forgotten.approval_id, by="k", ttl=None, now=301, task_expires_at=END)
    assert caught.value.detail is ControlCode.UNKNOWN_APPROVAL
    short = book()
    near = short.check(CALL, now=0, task_expires_at=50)
    assert (
        short.approve(near.approval_id, by="k", ttl=None, now=0, task_expires_at=50).expires_at == 50
    )  # never past the task


def test_a_failed_write_changes_nothing() -> None:
    from sidecar.errors import StateError

    class Broken:
        def save_approvals(self, approvals: object, dropped: object = ()) -> None:
            raise StateError("state.db", "disk full")

    approvals = ApprovalBook(ApprovalsSpec(), journal=Broken())
    with pytest.raises(StateError):
        approvals.check(CALL, now=1, task_expires_at=END)
    assert approvals.all() == ()


def _verifier() -> tuple[GrantVerifier, object, str]:
    key = load_signing_key(generate_private_key_pem(), "ES256", file="k", field="")
    verifier = GrantVerifier(
        root_keys={key.kid: key.private_key.public_key()}, root_ids=frozenset(), svids=None, max_depth=3
    )
    return verifier, key.private_key, key.kid


def test_approval_documents_and_operator_tokens() -> None:
    verifier, private, kid = _verifier()
    now = time.time()
    token = sign_approval("0123456789abcdef", private, issuer="ops", audience=AGENT, ttl=120, now=now, kid=kid)  # type: ignore[arg-type]
    assert verify_approval(token, verifier=verifier, approvers=frozenset(), audience=AGENT, now=now) == (
        f"key:{kid}",
        "0123456789abcdef",
        120.0,
    )
    refusals = {
        "another sidecar": (dict(audience="spiffe://td/ns/a/sa/x"), ControlCode.WRONG_AUDIENCE),
        "expired": (dict(now=now + 400), ControlCode.EXPIRED),
    }
    for what, (change, code) in refusals.items():
        with pytest.raises(ControlError) as caught:
            verify_approval(
                token, verifier=verifier, approvers=frozenset(), **{"audience": AGENT, "now": now, **change}
            )  # type: ignore[arg-type]
        assert caught.value.detail is code, what
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = sign_operator_token(stranger, issuer="x", audience=AGENT, now=now, lifetime=60, kid=kid)
    with pytest.raises(ControlError) as caught:
        verify_operator_token(forged, verifier=verifier, approvers=frozenset(), audience=AGENT, now=now)
    assert caught.value.detail is ControlCode.UNTRUSTED_SIGNER
    operator = sign_operator_token(private, issuer="ops", audience=AGENT, now=now, lifetime=99_999, kid=kid)  # type: ignore[arg-type]
    assert (
        verify_operator_token(operator, verifier=verifier, approvers=frozenset(), audience=AGENT, now=now)
        == f"key:{kid}"
    )


def test_the_anomaly_window_and_the_stricter_rule() -> None:
    detector = AnomalyDetector()
    rule = QuarantineRule(3, 10.0)
    assert detector.count("t", rule, decision_id="a", reason=Reason.PATH_NOT_ALLOWED, now=0) is None
    assert detector.count("t", rule, decision_id="b", reason=Reason.HOST_NOT_ALLOWED, now=5) is None
    assert detector.count("t", rule, decision_id="c", reason=Reason.PATH_NOT_ALLOWED, now=11) is None  # "a" aged out
    tripped = detector.count("t", rule, decision_id="d", reason=Reason.TOOL_NOT_ALLOWED, now=12)
    assert tripped is not None and [s.decision_id for s in tripped] == ["b", "c", "d"]
    assert detector.strikes("t") == ()  # starts over
    spec = QuarantineSpec(threshold=5, window=60)
    from tests.support.runtime import make_task_rule

    assert effective_rule(spec, make_task_rule(None)) == QuarantineRule(5, 60)
    assert effective_rule(spec, make_task_rule(QuarantineRule(2, 30))) == QuarantineRule(2, 60)
    assert effective_rule(QuarantineSpec(), make_task_rule(None)) is None


def test_the_schema_refuses_counting_budgets_and_expiry() -> None:
    from pydantic import ValidationError

    for reason in ("budget_exhausted", "task_expired", "task_quarantined", "approval_required"):
        with pytest.raises(ValidationError, match="not out-of-task kinds"):
            QuarantineSpec.model_validate({"threshold": 3, "reasons": [reason]})
    assert QuarantineSpec.model_validate({"reasons": ["tls_not_allowed"]}).reasons == [Reason.TLS_NOT_ALLOWED]


def test_the_headers_digest_binds_what_an_upstream_acts_on_and_nothing_volatile() -> None:
    base = {"content-type": "application/json", "x-delete-mode": "soft", "user-agent": "sdk/1"}
    volatile = {
        ":authority": "api.internal",
        "host": "api.internal",
        "authorization": "Bearer agent-credential",
        "x-request-id": "r1",
        "traceparent": "00-aa-bb-01",
        "x-b3-traceid": "1",
        "x-envoy-expected-rq-timeout-ms": "15000",
        "x-forwarded-proto": "http",
        "x-agent-authz-caller": "forged",
        "x-agent-task": "t1",
        "content-length": "0",
    }
    assert headers_digest({**base, **volatile}) == headers_digest(base)
    for name, value in (("x-http-method-override", "PURGE"), ("x-delete-mode", "hard"), ("cookie", "a=1")):
        assert headers_digest({**base, name: value}) != headers_digest(base), name
    assert headers_digest(volatile) == EMPTY_BODY
    assert replace(CALL, headers=headers_digest(base)).digest != CALL.digest
