"""Snapshots assembled in memory: a validated configuration, the carried state and in-memory files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SidecarConfig
from sidecar.errors import ConfigError, KeyLoadError
from sidecar.grants.revocations import RevocationList
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.engine import decide_egress
from sidecar.runtime.inputs import InputRecorder, MemoryFiles, fingerprint, inputs_unchanged
from sidecar.runtime.snapshot import CarriedState, build_snapshot
from sidecar.tokens.keys import generate_private_key_pem
from tests.support.config import AGENT, task
from tests.support.runtime import req

BASE = Path("/mem")
NOW = 1_800_000_000.0


def loaded(tasks: list[dict[str, Any]], **extra: Any) -> LoadedConfig:
    """A validated configuration that never touched a disk."""
    settings = SidecarConfig.model_validate(
        {"agent": AGENT, "issuer": {"url": "https://issuer.example", "signing_key": "keys/signing.pem"}, "tasks": tasks}
        | extra
    )
    return LoadedConfig(settings, BASE / "sidecar.yaml", BASE, hashlib.sha256(repr(tasks).encode()).hexdigest())


def files(**more: bytes) -> MemoryFiles:
    return MemoryFiles(
        {BASE / "keys/signing.pem": generate_private_key_pem(), **{BASE / k: v for k, v in more.items()}}
    )


def test_a_snapshot_is_built_in_memory_and_decides() -> None:
    snapshot = build_snapshot(loaded([task()]), CarriedState(), now=NOW, recorder=InputRecorder(files()))
    assert snapshot.policy.agent == AGENT and set(snapshot.policy.tasks_by_id) == {"t1"}
    assert snapshot.loaded.settings.tasks == []  # compiled, then dropped
    decision = decide_egress(
        snapshot.policy, req(), now=NOW, decision_id="d", budgets=BudgetLedger(), minter=snapshot.minter
    )
    assert decision.allow and decision.token is not None
    assert set(snapshot.inputs) == {BASE / "sidecar.yaml", BASE / "keys/signing.pem"}
    assert snapshot.carried.first_seen == {"t1": NOW}
    assert snapshot.carried.signing_key is not None and snapshot.carried.signing_key.kid == snapshot.keys.current.kid


def test_ttl_anchors_come_from_the_carried_state() -> None:
    config = loaded([task(ttl="60s")])
    first = build_snapshot(config, CarriedState(), now=NOW, recorder=InputRecorder(files()))
    later = build_snapshot(config, first.carried, now=NOW + 50, recorder=InputRecorder(files()))
    assert later.policy.tasks_by_id["t1"].expires_at == NOW + 60  # a rebuild never extends a task
    fresh = build_snapshot(config, CarriedState(), now=NOW + 50, recorder=InputRecorder(files()))
    assert fresh.policy.tasks_by_id["t1"].expires_at == NOW + 110


def test_a_new_signing_key_retires_the_carried_one_for_max_token_ttl() -> None:
    config = loaded([task()])
    first = build_snapshot(config, CarriedState(), now=NOW, recorder=InputRecorder(files()))
    rotated = build_snapshot(config, first.carried, now=NOW + 10, recorder=InputRecorder(files()))
    (retired,) = rotated.keys.retired
    assert retired.kid == first.keys.current.kid and retired.until == NOW + 10 + 300
    assert [k["kid"] for k in rotated.keys.jwks(NOW + 20)["keys"]] == [rotated.keys.current.kid, retired.kid]
    assert rotated.keys.jwks(NOW + 311)["keys"] == [rotated.keys.current.public_jwk]
    assert rotated.carried.retired == (retired,)


def test_own_revocations_in_the_carried_state_are_honoured() -> None:
    carried = CarriedState(own_revoked={"t1": int(NOW)})
    snapshot = build_snapshot(loaded([task()]), carried, now=NOW, recorder=InputRecorder(files()))
    (own,) = snapshot.grants.revocations
    assert own.signer == AGENT and own.ids == frozenset({"t1"}) and own.issued_at == int(NOW)
    assert snapshot.carried.own_revoked == {"t1": int(NOW)}


def test_the_carried_state_is_frozen_plain_data() -> None:
    carried = CarriedState(posted={"a": "x.y.z"})
    with pytest.raises(TypeError):
        carried.posted["b"] = "evil"  # type: ignore[index]
    assert carried.rebuild_key == ((("a", "x.y.z"),), (), ())
    received = CarriedState(received={"authority": (RevocationList("key:k", frozenset({"t1"}), 1, True, ""),)})
    with pytest.raises(TypeError):
        received.received["other"] = ()  # type: ignore[index]
    assert received.rebuild_key[2] == (("authority", (("key:k", True, ("t1",)),)),)


def test_a_failed_build_names_the_field_and_reports_what_it_read() -> None:
    recorder = InputRecorder(files())
    config = loaded(
        [
            task(
                egress=[
                    {
                        "host": "p.example",
                        "methods": ["GET"],
                        "paths": ["*"],
                        "credential": {"header": "x-k", "file": "k"},
                    }
                ]
            )
        ]
    )
    with pytest.raises(KeyLoadError, match=r"tasks\[0\]\.egress\[0\]\.credential\.file"):
        build_snapshot(config, CarriedState(), now=NOW, recorder=recorder)
    assert recorder.inputs()[BASE / "k"] == "error:2"  # missing: its arrival is a change


def test_the_workload_api_identity_must_have_arrived() -> None:
    config = loaded([task()], identity={"source": "workload_api"})
    with pytest.raises(ConfigError, match="no identity from the Workload API yet"):
        build_snapshot(config, CarriedState(), now=NOW, recorder=InputRecorder(files()))


def test_fingerprints_tell_whether_inputs_changed() -> None:
    memory = files(k=b"one")
    recorder = InputRecorder(memory)
    assert recorder.fetch(BASE / "k", 10) == b"one"
    assert recorder.exists(BASE / "absent") is False
    inputs = recorder.inputs()
    assert inputs_unchanged(memory, inputs)
    memory.files[BASE / "absent"] = b"now here"
    assert not inputs_unchanged(memory, inputs)
    del memory.files[BASE / "absent"]
    memory.files[BASE / "k"] = b"two"
    assert not inputs_unchanged(memory, inputs)
    assert fingerprint(memory, BASE / "k") == "sha256:" + hashlib.sha256(b"two").hexdigest()
