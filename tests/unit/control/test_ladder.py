"""The freeze ladder: targets, authority, order, replay, kills; and the signed actions it folds."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.control.documents import (
    Action,
    ActionKind,
    ControlCode,
    ControlError,
    Target,
    TargetKind,
    sign_action,
    verify_action,
)
from sidecar.control.ladder import Ladder
from sidecar.decision import Reason
from sidecar.grants.verify import GrantVerifier
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

ROOT = "spiffe://td/ns/ops/sa/orchestrator"
SUB = "spiffe://td/ns/ops/sa/worker"
OTHER = "spiffe://td/ns/ops/sa/other"
# q3 (root grant, signed by a root key) -> q3/m (delegated by ROOT to SUB)
PARENT = (("q3", ROOT, "key:k1"),)
CHILD = (("q3/m", SUB, ROOT), *PARENT)


def act(kind: str, target: str, *, at: float, signer: str = "key:k1", root: bool = True, source: str = "api") -> Action:
    return Action(f"id-{kind}-{target}-{at}", ActionKind(kind), Target.parse(target), at, signer, root, source=source)


def test_targets_parse_with_and_without_their_kind() -> None:
    assert Target.parse("subtree:q3") == Target(TargetKind.SUBTREE, "q3")
    assert Target.parse("q3/m") == Target(TargetKind.SUBTREE, "q3/m")
    assert Target.parse("task:q3") == Target(TargetKind.TASK, "q3")
    assert Target.parse(ROOT) == Target(TargetKind.AGENT, ROOT)
    assert str(Target.parse(f"agent:{ROOT}")) == f"agent:{ROOT}"
    for bad in ("agent:not-an-id", "task:", "subtree:../x", "has space"):
        with pytest.raises(ControlError) as caught:
            Target.parse(bad)
        assert caught.value.detail is ControlCode.MALFORMED


def test_a_subtree_freeze_reaches_below_a_task_freeze_does_not() -> None:
    ladder = Ladder([act("freeze", "subtree:q3", at=1)])
    assert ladder.verdict(CHILD) is not None and ladder.verdict(CHILD)[0] is Reason.TASK_QUARANTINED  # type: ignore[index]
    assert ladder.verdict(PARENT) is not None
    only = Ladder([act("freeze", "task:q3", at=1)])
    assert only.verdict(PARENT) is not None and only.verdict(CHILD) is None


def test_an_agent_target_covers_its_tasks_and_what_it_delegated() -> None:
    ladder = Ladder([act("freeze", f"agent:{ROOT}", at=1)])
    assert ladder.verdict(PARENT) is not None and ladder.verdict(CHILD) is not None  # CHILD's chain names ROOT
    assert ladder.verdict((("x", OTHER, "key:k1"),)) is None


def test_an_unfreeze_lifts_earlier_freezes_of_its_target_only() -> None:
    ladder = Ladder([act("freeze", "subtree:q3", at=1), act("unfreeze", "subtree:q3", at=2)])
    assert ladder.verdict(CHILD) is None
    later = Ladder([act("unfreeze", "subtree:q3", at=1), act("freeze", "subtree:q3", at=2)])
    assert later.verdict(CHILD) is not None, "an old unfreeze does not lift a newer freeze"
    other = Ladder([act("freeze", "subtree:q3", at=1), act("unfreeze", "task:q3/m", at=2)])
    assert other.verdict(CHILD) is not None, "an unfreeze of another target lifts nothing"


def test_a_kill_is_final_and_wins_over_a_freeze() -> None:
    ladder = Ladder(
        [act("kill", "subtree:q3", at=1), act("unfreeze", "subtree:q3", at=2), act("freeze", "task:q3/m", at=3)]
    )
    verdict = ladder.verdict(CHILD)
    assert verdict is not None and verdict[0] is Reason.TASK_REVOKED and verdict[1].kind is ActionKind.KILL


def test_authority_of_agent_signers() -> None:
    # the delegator may freeze what it delegated, and its own task; the sub-agent its own only
    assert Ladder([act("freeze", "subtree:q3/m", at=1, signer=ROOT, root=False)]).verdict(CHILD) is not None
    assert Ladder([act("freeze", "subtree:q3", at=1, signer=ROOT, root=False)]).verdict(CHILD) is not None
    assert Ladder([act("freeze", "subtree:q3/m", at=1, signer=SUB, root=False)]).verdict(CHILD) is not None
    assert Ladder([act("freeze", "subtree:q3", at=1, signer=SUB, root=False)]).verdict(PARENT) is None
    assert Ladder([act("kill", "subtree:q3", at=1, signer=OTHER, root=False)]).verdict(CHILD) is None
    assert Ladder([act("freeze", f"agent:{SUB}", at=1, signer=OTHER, root=False)]).verdict(CHILD) is None
    assert Ladder([act("freeze", f"agent:{SUB}", at=1, signer=SUB, root=False)]).verdict(CHILD) is not None
    # only a root issuer unfreezes, even what an agent froze
    frozen = [act("freeze", "subtree:q3/m", at=1, signer=ROOT, root=False)]
    assert Ladder([*frozen, act("unfreeze", "subtree:q3/m", at=2, signer=ROOT, root=False)]).verdict(CHILD) is not None
    # an own quarantine is always honoured (config tasks have no grant to judge authority by)
    own = act("freeze", "subtree:cfg", at=1, signer=OTHER, root=False, source="own")
    assert Ladder([own]).verdict((("cfg", SUB, ""),)) is not None


def test_adding_is_by_id_so_a_replay_changes_nothing() -> None:
    saved: list[list[str]] = []

    class Journal:
        def save_actions(self, actions: list[Action]) -> None:
            saved.append([a.action_id for a in actions])

    ladder = Ladder(journal=Journal())
    freeze = act("freeze", "subtree:q3", at=1)
    assert ladder.add([freeze, freeze]) == [freeze]
    assert ladder.add([freeze]) == []
    assert saved == [[freeze.action_id]] and len(ladder) == 1


def _verifier() -> tuple[GrantVerifier, object, str]:
    key = load_signing_key(generate_private_key_pem(), "ES256", file="k", field="")
    verifier = GrantVerifier(
        root_keys={key.kid: key.private_key.public_key()}, root_ids=frozenset(), svids=None, max_depth=3
    )
    return verifier, key.private_key, key.kid


def test_signed_actions_verify_and_refuse() -> None:
    verifier, private, kid = _verifier()
    now = time.time()
    token = sign_action(ActionKind.FREEZE, Target.parse("q3"), private, issuer="ops", at=now, reason="probing", kid=kid)  # type: ignore[arg-type]
    action = verify_action(token, verifier=verifier, now=now, source="api")
    assert (action.kind, str(action.target), action.root, action.reason) == (
        ActionKind.FREEZE,
        "subtree:q3",
        True,
        "probing",
    )
    assert action.signer == f"key:{kid}" and action.token == token
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = sign_action(ActionKind.UNFREEZE, Target.parse("q3"), stranger, issuer="x", at=now, kid=kid)
    with pytest.raises(ControlError) as caught:
        verify_action(forged, verifier=verifier, now=now, source="api")
    assert caught.value.detail is ControlCode.UNTRUSTED_SIGNER
    for junk in ("", "a.b", "e30.e30.e30", token + "x"):
        with pytest.raises(ControlError):
            verify_action(junk, verifier=verifier, now=now, source="api")
