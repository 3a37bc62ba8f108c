"""The durable state store: round trip, migrations, refusals (foreign, corrupt, reachable), locking,
kill -9 durability and write failures."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.control.approvals import Approval, ApprovalState
from sidecar.control.documents import Action, ActionKind, Target
from sidecar.control.quarantine import Strike
from sidecar.errors import StateError
from sidecar.grants.revocations import RevocationList
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.gates import CallBinding
from sidecar.state import MIGRATIONS, SCHEMA_VERSION, DelegatedChild, Remembered, StateStore

AGENT = "spiffe://test.example/ns/agents/sa/worker"
REPO = Path(__file__).resolve().parents[3]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another UID needs root")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


def opened(path: Path, **kw: object) -> StateStore:
    store = StateStore.open(path, **kw)  # type: ignore[arg-type]
    store.bind(AGENT)
    return store


FULL = Remembered(
    anchors={"t1": (1_800_000_000.5, 1_800_003_600.5), "gone": (1.0, 2.0)},
    posted={"g1": "aaa.bbb.ccc"},
    own_revoked={"t1": 1_800_000_100},
    received={
        "file:rev.jwt": (
            RevocationList("key:root", frozenset({"a", "b"}), 50, True, ""),
            RevocationList("spiffe://test.example/ns/x/sa/y", frozenset({"c"}), 60, False, ""),
        )
    },
    delegated={"g1/child": DelegatedChild("g1", 1_800_000_600.0, ((("g1", ""), 5), (("g1", "rule"), 2)))},
)


def test_round_trip_across_reopen(path: Path) -> None:
    store = opened(path)
    store.save(Remembered(), FULL)
    store.save_counters({("t1", ""): 3, ("t1", "h:0123"): 2, ("t1", "tool:é/x"): 1})
    store.close()
    again = opened(path)
    remembered, counters = again.load()
    assert remembered == FULL
    assert counters == {("t1", ""): 3, ("t1", "h:0123"): 2, ("t1", "tool:é/x"): 1}
    assert again.agent() == AGENT
    assert again.received("file:rev.jwt") == FULL.received["file:rev.jwt"] and again.received("feed:x") == ()
    again.close()


def test_save_writes_only_the_difference_and_a_dropped_task_takes_its_counters(path: Path) -> None:
    store = opened(path)
    store.save(Remembered(), FULL)
    store.save_counters({("gone", ""): 7, ("t1", ""): 1})
    later = Remembered(
        anchors={"t1": FULL.anchors["t1"]},
        posted={},
        own_revoked={**FULL.own_revoked, "t2": 5},
        received={},
        delegated={},
    )
    store.save(FULL, later)
    remembered, counters = store.load()
    assert remembered == later and counters == {("t1", ""): 1}
    store.close()


def test_received_revocations_by_source(path: Path) -> None:
    store = opened(path)
    lists = (RevocationList("key:root", frozenset({"x"}), 9, True, "tok"),)
    store.save_received("feed:cluster", lists)
    assert store.received("feed:cluster") == (RevocationList("key:root", frozenset({"x"}), 9, True, ""),)
    store.save_received("feed:cluster", ())
    assert store.received("feed:cluster") == ()
    store.close()


def test_files_are_private(path: Path) -> None:
    store = opened(path)
    store.save_counters({("t1", ""): 1})
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        assert (path.parent / name).stat().st_mode & 0o777 == 0o600, name
    store.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.db"]  # the WAL is checkpointed on close


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_refuses_a_directory_other_users_can_enter(path: Path, mode: int) -> None:
    opened(path).close()
    path.parent.chmod(mode)
    with pytest.raises(StateError, match=f"accessible to other users \\(mode {mode:04o}"):
        StateStore.open(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
def test_refuses_a_file_other_users_can_read(path: Path, mode: int) -> None:
    opened(path).close()
    path.chmod(mode)
    with pytest.raises(StateError, match=f"{path}.*accessible to other users"):
        StateStore.open(path)


@as_root
def test_refuses_a_file_or_directory_owned_by_another_uid(path: Path) -> None:
    opened(path).close()
    os.chown(path, 65534, 65534)
    with pytest.raises(StateError, match="belongs to UID 65534"):
        StateStore.open(path)
    os.chown(path, 0, 0)
    os.chown(path.parent, 65534, 65534)
    with pytest.raises(StateError, match=r"state directory .* belongs to UID 65534"):
        StateStore.open(path)


def test_refuses_a_symlink(path: Path, tmp_path: Path) -> None:
    opened(path).close()
    path.rename(tmp_path / "elsewhere.db")
    path.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(StateError, match="not a regular file"):
        StateStore.open(path)


def test_refuses_a_file_that_is_not_sqlite(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"agent-authz was here\n" * 300)
    path.chmod(0o600)
    with pytest.raises(StateError, match=f"{path}: not a SQLite database") as raised:
        StateStore.open(path)
    assert "delete the file" in str(raised.value)
    assert path.read_bytes() == b"agent-authz was here\n" * 300  # never reset


def test_refuses_an_empty_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.touch(mode=0o600)
    with pytest.raises(StateError, match="the file is empty"):
        StateStore.open(path)
    assert path.stat().st_size == 0


def test_refuses_a_truncated_file(path: Path) -> None:
    store = opened(path)
    for i in range(1000):  # enough rows for many pages of the counter table
        store.save_counters({(f"task-{i:04d}-{'x' * 40}", ""): i})
    store.close()
    size = path.stat().st_size
    assert size > 16 * 4096
    with path.open("r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(StateError, match=r"corrupt|malformed|damaged"):
        StateStore.open(path)


def test_refuses_another_applications_database(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.commit()
    db.close()
    path.chmod(0o600)
    with pytest.raises(StateError, match="not an agent-authz state file"):
        StateStore.open(path)
    assert sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


def test_refuses_a_newer_schema(path: Path) -> None:
    opened(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        StateStore.open(path)


def test_refuses_another_agents_file(path: Path) -> None:
    opened(path).close()
    store = StateStore.open(path)
    with pytest.raises(StateError, match=r"belongs to agent spiffe://test\.example/ns/agents/sa/worker \(same trust"):
        store.bind("spiffe://test.example/ns/agents/sa/other")
    with pytest.raises(StateError, match=re.escape("trust domain test.example, this sidecar is in partner.example")):
        store.bind("spiffe://partner.example/ns/agents/sa/worker")
    store.bind(AGENT)
    store.close()


def test_migration_adds_a_table_and_keeps_the_data(path: Path) -> None:
    store = opened(path)
    store.save(Remembered(), FULL)
    store.save_counters({("t1", ""): 4})
    store.close()
    later = (*MIGRATIONS, "CREATE TABLE later_feature (id TEXT PRIMARY KEY, state TEXT NOT NULL) STRICT;")
    migrated = StateStore.open(path, migrations=later)
    migrated.bind(AGENT)
    assert migrated.load() == (FULL, {("t1", ""): 4})
    migrated.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
    assert ("later_feature",) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    db.close()
    with pytest.raises(StateError, match="newer"):  # this version cannot read what the later one wrote
        StateStore.open(path)


def test_a_failed_migration_changes_nothing(path: Path) -> None:
    opened(path).close()
    broken = (*MIGRATIONS, "CREATE TABLE later_feature (id TEXT); CREATE TABLE later_feature (id TEXT);")
    with pytest.raises(StateError, match="cannot prepare"):
        StateStore.open(path, migrations=broken)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert ("later_feature",) not in db.execute("SELECT name FROM sqlite_master").fetchall()
    db.close()


def test_one_process_at_a_time(path: Path) -> None:
    first = opened(path)
    with pytest.raises(StateError, match="another process has this state directory open"):
        StateStore.open(path)
    first.close()
    opened(path).close()


def _child(script: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_every_committed_charge_survives_kill_9(path: Path) -> None:
    """A child charges a budget as fast as it can and reports each charge after it returned; killed
    with SIGKILL mid-stream, the file holds every charge it reported (and at most the one in flight)."""
    opened(path).close()
    child = _child(
        """
        import sys
        from sidecar.policy.budget import BudgetLedger
        from sidecar.state import StateStore
        store = StateStore.open(sys.argv[1])
        ledger = BudgetLedger(store.load()[1], journal=store)
        limits = ((("t1", ""), 1_000_000), (("t1", "r"), None))
        while True:
            assert ledger.try_consume(limits)
            print(ledger.used(("t1", "")), flush=True)
        """,
        path,
    )
    assert child.stdout is not None
    reported = 0
    for line in child.stdout:
        reported = int(line)
        if reported >= 2000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    for line in child.stdout:  # what it reported before it died, still in the pipe
        if line.strip():
            reported = int(line)
    child.stdout.close()
    store = opened(path)
    _, counters = store.load()
    store.close()
    assert reported >= 2000
    assert counters[("t1", "")] in (reported, reported + 1)  # + the one committed but not yet reported
    assert ("t1", "r") not in counters  # an unlimited counter limits nothing and is not written


def test_a_write_that_fails_spends_nothing(path: Path) -> None:
    """The file system refuses the write (RLIMIT_FSIZE, as a full disk would): StateError, and the
    ledger is unchanged."""
    store = opened(path)
    store.save_counters({("t1", ""): 1})
    store.close()
    child = _child(
        """
        import json, resource, signal, sys
        from sidecar.errors import StateError
        from sidecar.policy.budget import BudgetLedger
        from sidecar.state import StateStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = StateStore.open(sys.argv[1])
        ledger = BudgetLedger(store.load()[1], journal=store)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        try:
            ledger.try_consume(((("t1", ""), 10),))
            outcome = "allowed"
        except StateError as exc:
            outcome = str(exc)
        print(json.dumps({"outcome": outcome, "used": ledger.used(("t1", ""))}))
        """,
        path,
    )
    out, _ = child.communicate(timeout=30)
    result = json.loads(out)
    assert "cannot write the call counters" in result["outcome"] and result["used"] == 1


def test_ledger_with_a_store_stays_exact(path: Path) -> None:
    store = opened(path)
    ledger = BudgetLedger(journal=store)
    limits = ((("t1", ""), 5), (("t1", "r"), 3))
    assert [ledger.try_consume(limits) for _ in range(5)] == [True, True, True, False, False]
    assert ledger.try_reserve({("t1", ""): (2, 5)})
    assert not ledger.try_reserve({("t1", ""): (1, 5)})
    store.close()
    again = opened(path)
    assert again.load()[1] == {("t1", ""): 5, ("t1", "r"): 3}
    again.close()


def test_the_child_grant_and_the_feed_contact_survive_a_reopen(path: Path) -> None:
    child = DelegatedChild("g1", 1_800_000_600.0, ((("g1", ""), 5),), "hdr.payload.sig")
    store = opened(path)
    assert store.feed_contact() is None
    store.save(Remembered(), Remembered(delegated={"g1/child": child}))
    store.save_feed_contact(1_800_000_000.25)
    store.save_feed_contact(1_800_000_005.5)
    store.close()
    again = opened(path)
    assert again.load()[0].delegated == {"g1/child": child}
    assert again.load()[0].delegated["g1/child"].token == "hdr.payload.sig"
    assert again.feed_contact() == 1_800_000_005.5
    again.close()


def test_a_version_1_file_is_migrated_through_2_to_3_keeping_its_rows(path: Path) -> None:
    """A file written before continuous verification and the child grant: its delegation rows stay
    (with no token: a forward after the restart carries none, as before), the continuous verification
    tables arrive empty and the feed contact starts unknown."""
    old = StateStore.open(path, migrations=MIGRATIONS[:1])
    old.bind(AGENT)
    old.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO delegation VALUES ('g1/child', 'g1', 1800000600.0, '[]')")
    db.execute("INSERT INTO own_revocation VALUES ('t9', 1800000100)")
    db.commit()
    db.close()
    migrated = opened(path)
    remembered = migrated.load()[0]
    assert remembered.delegated == {"g1/child": DelegatedChild("g1", 1_800_000_600.0, (), "")}
    assert remembered.own_revoked == {"t9": 1_800_000_100}
    assert migrated.feed_contact() is None
    assert migrated.load_actions() == [] and migrated.load_strikes() == {} and migrated.load_approvals() == []
    migrated.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    db.close()


def test_a_version_2_file_is_migrated_keeping_its_continuous_verification_rows(path: Path) -> None:
    """A file of schema 2 (continuous verification): its ladder actions, strikes, approvals and
    delegations stay as they were; the delegations get an empty child grant and the feed contact
    starts unknown."""
    action = Action("0123456789abcdefghij", ActionKind.FREEZE, Target.parse(f"agent:{AGENT}"), 1.5, "key:k", True,
                    "why", ("d1",), "file:/x", "a.b.c")  # fmt: skip
    call = CallBinding(AGENT, "t1", "h", 80, "DELETE", "/p", "", "drop", "sha256:x", "v1")
    approval = Approval("fedcba9876543210", call, ApprovalState.PENDING, 1.0, 9.0)
    old = StateStore.open(path, migrations=MIGRATIONS[:2])
    old.bind(AGENT)
    old.save_actions([action])
    old.save_strikes("t1", [Strike("d1", 1.0, "path_not_allowed")])
    old.save_approvals([approval])
    old.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    db.execute("INSERT INTO delegation VALUES ('g1/child', 'g1', 1800000600.0, '[]')")
    db.commit()
    db.close()
    migrated = opened(path)
    assert migrated.load_actions() == [action]
    assert migrated.load_strikes() == {"t1": [Strike("d1", 1.0, "path_not_allowed")]}
    assert migrated.load_approvals() == [approval]
    assert migrated.load()[0].delegated == {"g1/child": DelegatedChild("g1", 1_800_000_600.0, (), "")}
    assert migrated.feed_contact() is None
    migrated.save_feed_contact(1_800_000_001.0)  # the new table is writable
    migrated.close()
    again = opened(path)
    assert again.feed_contact() == 1_800_000_001.0 and again.load_actions() == [action]
    again.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    db.close()
