"""The runtime on a durable state: what a restart (a new Runtime on the same file) must not forget."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.decision import AuthzRequest, Direction, Reason
from sidecar.errors import StateError
from sidecar.grants.issue import DelegationRequest
from sidecar.grants.revocations import sign_revocations
from sidecar.runtime import Runtime, TaskService
from sidecar.state import StateStore
from tests.support.config import OTHER_AGENT, base_config, task, write_config, write_keys
from tests.support.grants_env import ORCH, SUB, Scenario
from tests.support.runtime import Clock, req

REPO = Path(__file__).resolve().parents[3]


class Sidecar:
    """A runtime on one config and one state file that can be "restarted" (store closed, reopened)."""

    def __init__(self, config: Path, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock(time.time())
        self.state = config.parent / "state" / "state.db"
        self.store: StateStore | None = None
        self.tasks = self.start()

    def start(self) -> TaskService:
        self.store = StateStore.open(self.state)
        try:
            self.tasks = TaskService(Runtime(self.config, clock=self.clock, store=self.store))
        except BaseException:
            self.store.close()
            raise
        return self.tasks

    def restart(self) -> TaskService:
        assert self.store is not None
        self.store.close()
        return self.start()

    @property
    def runtime(self) -> Runtime:
        return self.tasks.runtime

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


@pytest.fixture
def sidecars() -> Iterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for sidecar in started:
        sidecar.close()


def local(tmp_path: Path, tasks: list[dict[str, Any]], sidecars: list[Sidecar], clock: Clock | None = None) -> Sidecar:
    write_keys(tmp_path)
    write_config(tmp_path, base_config(tmp_path, tasks))
    sidecar = Sidecar(tmp_path / "sidecar.yaml", clock)
    sidecars.append(sidecar)
    return sidecar


RULES = [{"name": "r", "host": "api.internal", "methods": ["GET"], "paths": ["*"], "max_calls": 4}]
OTHER_TASK = task("t2", egress=[{"host": "other.internal", "methods": ["GET"], "paths": ["*"]}])


def test_budgets_survive_a_restart(tmp_path: Path, sidecars: list[Sidecar]) -> None:
    sidecar = local(tmp_path, [task(egress=RULES, max_calls=5)], sidecars)
    assert all(sidecar.runtime.decide(req("/a"), str(i)).allow for i in range(3))
    sidecar.restart()
    assert sidecar.runtime.budgets.used(("t1", "")) == 3 and sidecar.runtime.budgets.used(("t1", "r")) == 3
    assert sidecar.runtime.decide(req("/a"), "x").allow
    assert sidecar.runtime.decide(req("/a"), "y").reason is Reason.BUDGET_EXHAUSTED  # the rule's 4
    sidecar.restart()
    assert sidecar.runtime.decide(req("/a"), "z").reason is Reason.BUDGET_EXHAUSTED


def test_ttl_expires_at_the_same_instant_across_restarts(tmp_path: Path, sidecars: list[Sidecar]) -> None:
    clock = Clock(1_800_000_000.0)
    sidecar = local(tmp_path, [task(ttl="1h")], sidecars, clock)
    assert sidecar.runtime.snapshot.policy.tasks_by_id["t1"].expires_at == 1_800_003_600.0
    for later in (1_800_001_000.0, 1_800_002_000.0):
        clock.now = later
        sidecar.restart()
        assert sidecar.runtime.snapshot.policy.tasks_by_id["t1"].expires_at == 1_800_003_600.0
    clock.now = 1_800_003_599.0
    assert sidecar.runtime.decide(req(), "a").allow
    clock.now = 1_800_003_600.0
    assert sidecar.runtime.decide(req(), "b").reason is Reason.TASK_EXPIRED


def test_a_task_that_goes_away_and_comes_back_is_neither_extended_nor_refilled(
    tmp_path: Path, sidecars: list[Sidecar]
) -> None:
    clock = Clock(1_800_000_000.0)
    declared = task(egress=RULES, ttl="1h")
    sidecar = local(tmp_path, [declared], sidecars, clock)
    assert sidecar.runtime.decide(req(), "a").allow
    config = base_config(tmp_path, [])
    write_config(tmp_path, config)
    clock.now += 600
    assert sidecar.runtime.reload()
    assert "t1" not in sidecar.runtime.snapshot.policy.tasks_by_id
    sidecar.restart()  # while the task is absent
    write_config(tmp_path, base_config(tmp_path, [declared]))
    assert sidecar.runtime.reload()
    assert sidecar.runtime.snapshot.policy.tasks_by_id["t1"].expires_at == 1_800_003_600.0
    assert sidecar.runtime.budgets.used(("t1", "r")) == 1
    # still declared after its end, it stays expired: the anchor is kept
    clock.now = 1_800_003_601.0
    write_config(tmp_path, base_config(tmp_path, [declared, OTHER_TASK]))
    assert sidecar.runtime.reload()
    assert sidecar.runtime.decide(req(), "b").reason is Reason.TASK_EXPIRED
    # once a build after its end no longer has it, it is forgotten: declared again, it is a new task
    write_config(tmp_path, base_config(tmp_path, [OTHER_TASK]))
    assert sidecar.runtime.reload()
    sidecar.restart()
    assert sidecar.runtime.budgets.used(("t1", "r")) == 0
    write_config(tmp_path, base_config(tmp_path, [declared]))
    assert sidecar.runtime.reload()
    assert sidecar.runtime.snapshot.policy.tasks_by_id["t1"].expires_at == 1_800_007_201.0
    assert sidecar.runtime.budgets.used(("t1", "r")) == 0


def test_another_agents_state_is_refused(tmp_path: Path, sidecars: list[Sidecar]) -> None:
    sidecar = local(tmp_path, [task()], sidecars)
    sidecar.close()
    config = base_config(tmp_path, [task(agent=OTHER_AGENT)])
    config["agent"] = OTHER_AGENT
    write_config(tmp_path, config)
    with pytest.raises(StateError, match=f"belongs to agent .*worker .*not to {OTHER_AGENT}"):
        sidecar.start()


def test_a_failed_write_denies_and_spends_nothing(tmp_path: Path, sidecars: list[Sidecar]) -> None:
    sidecar = local(tmp_path, [task(egress=RULES, max_calls=5)], sidecars)
    assert sidecar.runtime.decide(req(), "a").allow
    sidecar.close()
    script = """
        import json, resource, signal, sys
        from sidecar.runtime import Runtime
        from sidecar.state import StateStore
        from tests.support.runtime import req
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        runtime = Runtime(sys.argv[1], store=StateStore.open(sys.argv[2]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        decision = runtime.decide(req(), "d")
        print(json.dumps([decision.reason.value, decision.detail, runtime.budgets.used(("t1", ""))]))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(sidecar.config), str(sidecar.state)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    ).stdout
    assert "state_write_failed" in out  # structlog's console line, then the result
    assert json.loads(out.splitlines()[-1]) == ["internal_error", "the call counter could not be stored", 1]


# -- the task API's changes ---------------------------------------------------------------------------
@pytest.fixture
def sc(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path)


DELEGATION = {
    "subject": SUB,
    "ttl": "10m",
    "name": "market",
    "max_calls": 10,
    "egress": [{"host": "market.internal", "methods": ["GET"], "paths": ["/v1/prices/ACME/*"], "max_calls": 3}],
}


def egress(host: str, path: str) -> AuthzRequest:
    return AuthzRequest(Direction.EGRESS, "GET", "http", host, path, {})


def published_ids(path: Path) -> list[str]:
    return list(jwt.decode(path.read_text().strip(), options={"verify_signature": False})["revoked"])


def test_revocations_delegations_and_reservations_survive_restarts(sc: Scenario, sidecars: list[Sidecar]) -> None:
    orch = Sidecar(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True))
    sidecars.append(orch)
    first, _ = orch.tasks.delegate("q3", DelegationRequest.model_validate(DELEGATION))
    orch.tasks.delegate("q3", DelegationRequest.model_validate({**DELEGATION, "name": "second"}))
    assert orch.runtime.budgets.used(("q3", "")) == 20

    orch.restart()
    assert orch.runtime.budgets.used(("q3", "")) == 20 and orch.runtime.budgets.used(("q3", "prices")) == 6
    assert orch.tasks.revocation_list() is None  # nothing revoked yet
    orch.tasks.revoke("q3/market")  # a child it delegated before the restart
    publish = sc.root / "orch" / "revocations.jwt"
    assert published_ids(publish) == ["q3/market"]

    publish.unlink()
    orch.restart()
    assert published_ids(publish) == ["q3/market"]  # signed and published again at start
    assert orch.tasks.revocation_list() is not None
    orch.restart()
    orch.tasks.revoke("q3/second")
    assert published_ids(publish) == ["q3/market", "q3/second"]
    orch.restart()
    assert published_ids(publish) == ["q3/market", "q3/second"]
    assert set(orch.runtime.carried.own_revoked) == {"q3/market", "q3/second"}

    sub = Sidecar(sc.agent_config("sub", SUB, sc.root, revocations=[publish]))
    sidecars.append(sub)
    sub.tasks.accept(first)
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/x"), "a").reason is Reason.TASK_REVOKED


def test_a_posted_grant_survives_a_restart_and_is_verified_again(sc: Scenario, sidecars: list[Sidecar]) -> None:
    orch = Sidecar(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True))
    sidecars.append(orch)
    token, _ = orch.tasks.delegate("q3", DelegationRequest.model_validate(DELEGATION))
    sub = Sidecar(sc.agent_config("sub", SUB, sc.root, revocations=[sc.root / "orch" / "revocations.jwt"]))
    sidecars.append(sub)
    sub.tasks.accept(token)
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/1"), "a").allow
    sub.restart()
    assert "q3/market" in sub.runtime.snapshot.policy.tasks_by_id
    assert sub.runtime.budgets.used(("q3/market", "")) == 1
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/2"), "b").allow
    # verified again on load: a stored grant altered behind the sidecar's back is not enforced
    sub.close()
    head, body, signature = token.split(".")
    forged = f"{head}.{body[:-4]}AAAA.{signature}"
    db = sqlite3.connect(sub.state)
    db.execute("UPDATE posted_grant SET token = ? WHERE task_id = 'q3/market'", (forged,))
    db.commit()
    db.close()
    sub.start()
    assert "q3/market" not in sub.runtime.snapshot.policy.tasks_by_id
    assert sub.runtime.decide(egress("market.internal", "/v1/prices/ACME/3"), "c").reason is Reason.NO_TASK


def test_received_revocations_stay_when_the_list_shrinks(sc: Scenario, sidecars: list[Sidecar]) -> None:
    orch = Sidecar(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True))
    sidecars.append(orch)
    token, _ = orch.tasks.delegate("q3", DelegationRequest.model_validate(DELEGATION))
    publish = sc.root / "orch" / "revocations.jwt"
    sub = Sidecar(sc.agent_config("sub", SUB, sc.root, revocations=[publish]))
    sidecars.append(sub)
    sub.tasks.accept(token)
    orch.tasks.revoke("q3/market")
    assert sub.runtime.reload()
    market = egress("market.internal", "/v1/prices/ACME/1")
    assert sub.runtime.decide(market, "a").reason is Reason.TASK_REVOKED
    # the publisher's file is replaced with a later list of the same signer that omits the id
    state = orch.runtime.snapshot.identity
    assert state is not None
    svid = state.state.svid
    publish.write_text(
        sign_revocations([], svid.private_key, issuer=ORCH, issued_at=int(time.time()) + 5, x5c=list(svid.chain))
    )
    assert sub.runtime.reload()
    assert sub.runtime.decide(market, "b").reason is Reason.TASK_REVOKED
    publish.unlink()
    sub.restart()
    assert sub.runtime.decide(market, "c").reason is Reason.TASK_REVOKED
    assert sub.store is not None
    assert [r.ids for r in sub.store.received(f"file:{publish}")] == [frozenset({"q3/market"})]


def test_a_revocation_that_cannot_be_stored_still_applies_and_is_published(sc: Scenario) -> None:
    config = sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True)
    StateStore.open(config.parent / "state" / "state.db").close()
    script = """
        import json, resource, signal, sys
        from sidecar.decision import AuthzRequest, Direction
        from sidecar.errors import StateError
        from sidecar.runtime import Runtime, TaskService
        from sidecar.state import StateStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        tasks = TaskService(Runtime(sys.argv[1], store=StateStore.open(sys.argv[2])))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # no room for a WAL frame
        try:
            tasks.revoke("q3")
            outcome = "stored"
        except StateError as exc:
            outcome = exc.reason
        call = AuthzRequest(Direction.EGRESS, "GET", "http", "market.internal", "/v1/prices/X", {})
        print(json.dumps([outcome, tasks.runtime.decide(call, "d").reason.value]))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(config), str(config.parent / "state" / "state.db")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    ).stdout
    outcome, reason = json.loads(out.splitlines()[-1])
    assert outcome.startswith("revoked here and published, but not stored") and reason == "task_revoked"
    assert published_ids(sc.root / "orch" / "revocations.jwt") == ["q3"]
