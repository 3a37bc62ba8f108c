"""The durable enforcement state of one sidecar: a SQLite database in WAL mode (``state.path``).

What is kept (one table each, schema below): the anchor time and last known end of every task (the
``ttl`` anchor; the task's counters are kept as long as it could still be valid), the call counters
that have a limit (used and reserved for delegated tasks, per task and per rule), the grants
accepted through ``POST /v1/tasks``, this sidecar's own revocations, the revocation lists received
from each source, and the child tasks it delegated (with what each reserved). Since schema 2 also
continuous verification: the ladder actions honoured (freezes, unfreezes, kills - own quarantines
and signed ones), the anomaly rule's strikes per task, and approvals (waiting, granted, used). Since
schema 3 the child grant of each delegation and the time of the last contact with the cluster
authority's revocation feed. ``meta`` names the agent the file belongs to.

Durability: WAL mode; every change is one transaction, committed before the answer that depends on
it (an allowed call is counted before it is allowed). With ``synchronous=NORMAL`` (the default) a
commit is a ``write`` of WAL frames: it reaches the operating system, so it survives a crash or
``kill -9`` of the sidecar; the WAL is ``fsync``-ed at each checkpoint (about every 1,000 pages), so
a power loss may lose the commits since the last one (a consistent, older state, never a corrupt
file). ``synchronous=FULL`` also ``fsync``-s every commit.

Fail closed: a file that is not an agent-authz state file, belongs to another agent, has a newer
schema, is empty, truncated or corrupt, or that another user could read (file not ``0600``, its
directory not ``0700``, another owner) is refused at start with a :class:`StateError` naming it;
nothing is ever reset silently. One process at a time: the directory is locked (``flock``).

Versioned schema: ``PRAGMA application_id`` marks the file, ``PRAGMA user_version`` is the number
of :data:`MIGRATIONS` applied. A later feature adds its tables by appending a migration; an older
file is migrated at start, in one transaction per step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

from sidecar.control.approvals import Approval, ApprovalState
from sidecar.control.documents import Action, ActionKind, Target
from sidecar.control.quarantine import Strike
from sidecar.errors import SpiffeIdError, StateError
from sidecar.grants.revocations import RevocationList
from sidecar.identity.spiffe_id import parse_spiffe_id
from sidecar.policy.budget import BudgetKey
from sidecar.policy.gates import CallBinding

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "DelegatedChild",
    "Remembered",
    "StateStore",
]

APPLICATION_ID = 0x41415A53
"""``PRAGMA application_id`` of an agent-authz state file (``AAZS``)."""

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT, WITHOUT ROWID;
    CREATE TABLE task (
        task_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, ends REAL NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE budget (
        task_id TEXT NOT NULL, counter TEXT NOT NULL, used INTEGER NOT NULL CHECK (used >= 0),
        PRIMARY KEY (task_id, counter)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE posted_grant (task_id TEXT PRIMARY KEY, token TEXT NOT NULL) STRICT, WITHOUT ROWID;
    CREATE TABLE own_revocation (task_id TEXT PRIMARY KEY, revoked_at INTEGER NOT NULL) STRICT, WITHOUT ROWID;
    CREATE TABLE received_revocation (
        source TEXT NOT NULL, signer TEXT NOT NULL, root INTEGER NOT NULL, task_id TEXT NOT NULL,
        issued_at INTEGER NOT NULL, PRIMARY KEY (source, signer, root, task_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE delegation (
        child_id TEXT PRIMARY KEY, parent_id TEXT NOT NULL, expires_at REAL NOT NULL, reserved TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    """,
    # 2: continuous verification (issue 15): ladder actions, quarantine strikes, approvals
    """
    CREATE TABLE ladder_action (
        action_id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('freeze', 'unfreeze', 'kill')),
        target TEXT NOT NULL, at REAL NOT NULL, signer TEXT NOT NULL, root INTEGER NOT NULL,
        reason TEXT NOT NULL, evidence TEXT NOT NULL, source TEXT NOT NULL, token TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE quarantine_strike (
        task_id TEXT NOT NULL, decision_id TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
        PRIMARY KEY (task_id, decision_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE approval (
        approval_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, state TEXT NOT NULL, call TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, approved_at REAL, approved_by TEXT,
        used_at REAL, used_by TEXT
    ) STRICT, WITHOUT ROWID;
    """,
    # 3: the child grant itself (a revoke forwarded after a restart shows the authority over the
    # child), and the last contact with the cluster authority's revocation feed
    """
    ALTER TABLE delegation ADD COLUMN token TEXT NOT NULL DEFAULT '';
    CREATE TABLE feed_contact (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL) STRICT;
    """,
)
"""The schema, as SQL scripts: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes (``PRAGMA user_version``)."""

_PAGE_SIZE = 4096
_BUSY_TIMEOUT_MS = 100  # only this process writes (the directory lock); never wait long on the event loop
_MIN_SQLITE = (3, 37, 0)  # STRICT tables
_RECOVERY = (
    "to start afresh, stop the sidecar and delete the file (and its -wal and -shm files) knowingly: every "
    "revocation made here, every budget spent, every posted grant, every ttl anchor, every freeze, kill and "
    "approval is forgotten (docs/concepts/state.md#recovery)"
)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class DelegatedChild:
    """A child task this sidecar delegated (``POST /v1/tasks/{id}/delegate``).

    Attributes:
        parent: the delegating task's id.
        expires_at: the child's end (POSIX seconds); after it, the record is dropped.
        reserved: the parent's counters and the calls reserved from each for the child.
        token: the child grant (compact JWS) as it was issued; a revocation of the child forwarded
            to the cluster authority presents it as the proof of this agent's authority (``""`` for
            records written before schema version 3).
    """

    parent: str
    expires_at: float
    reserved: tuple[tuple[BudgetKey, int], ...] = ()
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Remembered:
    """The state a snapshot build carries forward, as the store keeps it (the counters apart).

    Attributes:
        anchors: task id -> ``(first seen, end)`` in POSIX seconds: the ``ttl`` anchor, and until
            when the task (and its counters) must be remembered.
        posted: task id -> compact JWS of a grant accepted through ``POST /v1/tasks``.
        own_revoked: task id -> POSIX seconds it was revoked here.
        received: source -> the revocation lists received from it (merged per signer).
        delegated: child task id -> :class:`DelegatedChild`.
    """

    anchors: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    posted: Mapping[str, str] = field(default_factory=dict)
    own_revoked: Mapping[str, int] = field(default_factory=dict)
    received: Mapping[str, tuple[RevocationList, ...]] = field(default_factory=dict)
    delegated: Mapping[str, DelegatedChild] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("anchors", "posted", "own_revoked", "received", "delegated"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


def _counter_text(key: BudgetKey) -> str:
    return json.dumps(list(key[1:]), ensure_ascii=False, separators=(",", ":"))


def _key(task_id: str, counter: str) -> BudgetKey:
    parts = json.loads(counter)
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"counter {counter!r} is not a list of strings")
    return cast(BudgetKey, (task_id, *parts))


def _check_dir(directory: Path, file: str) -> None:
    """Create ``directory`` ``0700`` if missing; refuse one another user owns or could enter."""
    try:
        if not directory.exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700)
            directory.chmod(0o700)
        info = directory.stat()
    except OSError as exc:
        raise StateError(file, f"cannot create or read the state directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(file, f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise StateError(file, f"the state directory {directory} belongs to UID {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & 0o077:
        raise StateError(
            file,
            f"the state directory {directory} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o}, "
            "must be 0700)",
        )


def _check_file(path: Path, file: str) -> None:
    """Refuse a state file (or its -wal/-shm) that is not a regular file of ours, ``0600``."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(file, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise StateError(file, f"{path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise StateError(file, f"{path} belongs to UID {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & 0o077:
        raise StateError(
            file, f"{path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o}, must be 0600)"
        )


def _migrate(db: sqlite3.Connection, version: int, migrations: tuple[str, ...]) -> None:
    """Apply ``migrations[version:]``, one transaction per step (a failed step changes nothing)."""
    for step in range(version, len(migrations)):
        try:
            db.executescript(f"BEGIN IMMEDIATE;\n{migrations[step]}\nPRAGMA user_version = {step + 1};\nCOMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _create(path: Path, migrations: tuple[str, ...]) -> None:
    """Write a new, empty state file: built under a temporary name, then renamed into place, so a
    crash while creating leaves no half-made file (an empty or partial ``path`` is always refused)."""
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise sqlite3.OperationalError("WAL mode unavailable")
        _migrate(db, 0, migrations)
    finally:
        db.close()  # the last connection checkpoints and removes the WAL
    for orphan in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        orphan.unlink(missing_ok=True)  # of a deleted file: SQLite would replay an old WAL into the new one
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StateStore:
    """The durable state of one sidecar. Open it with :meth:`open`; use it from one thread.

    The hot path is :meth:`save_counters` (one statement, one commit); everything else runs on
    configuration builds and task API calls.

    Attributes:
        path: the state file.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, lock: int) -> None:
        """Use :meth:`open`: it checks the file and takes the directory lock ``lock`` (an fd) first."""
        self.path = path
        self._db = db
        self._lock = lock
        self._file = str(path)
        self._upserts: dict[int, str] = {}
        self._names: dict[BudgetKey, str] = {}

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        migrations: tuple[str, ...] = MIGRATIONS,
    ) -> StateStore:
        """Open (or create) the state file at ``path``, checking everything before anything is read.

        Args:
            path: the state file; its directory is created ``0700`` when missing.
            synchronous: SQLite's ``synchronous`` setting in WAL mode (see the module docstring).
            migrations: the schema steps (tests pass more to exercise a migration).

        Raises:
            StateError: the directory or file is accessible to other users or owned by another UID;
                another process has it open; the file is empty, not SQLite, not an agent-authz state
                file, of a newer schema, or corrupt; SQLite is older than 3.37.
        """
        path = Path(path).absolute()
        file = str(path)
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StateError(file, f"SQLite {sqlite3.sqlite_version} is too old (3.37 or later is needed)")
        _check_dir(path.parent, file)
        lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(file, "another process has this state directory open (one sidecar each)") from None
            return cls._open_locked(path, synchronous, migrations, lock)
        except BaseException:
            os.close(lock)
            raise

    @classmethod
    def _open_locked(cls, path: Path, synchronous: str, migrations: tuple[str, ...], lock: int) -> StateStore:
        file = str(path)
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            _check_file(path.with_name(name), file)
        try:
            if not path.exists():
                _create(path, migrations)
            elif path.stat().st_size == 0:
                raise StateError(file, f"the file is empty (a state file never is: truncated?); {_RECOVERY}")
        except OSError as exc:
            raise StateError(file, f"cannot create the state file: {exc.strerror or exc}") from None
        try:
            db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(file, f"cannot open: {exc}") from None
        try:
            cls._check_and_migrate(db, file, synchronous, migrations)
        except BaseException:
            db.close()
            raise
        return cls(path, db, lock)

    @staticmethod
    def _check_and_migrate(db: sqlite3.Connection, file: str, synchronous: str, migrations: tuple[str, ...]) -> None:
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StateError(file, f"not a SQLite database, or damaged ({exc}); {_RECOVERY}") from None
        if app_id != APPLICATION_ID:
            raise StateError(
                file, f"not an agent-authz state file (SQLite application_id {app_id:#x}); it is not touched"
            )
        if version > len(migrations):
            raise StateError(
                file,
                f"schema version {version} is newer than this agent-authz knows ({len(migrations)}): "
                "run the version that wrote it, or delete the file knowingly",
            )
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            raise StateError(file, f"corrupt ({exc}); {_RECOVERY}") from None
        if problems != ["ok"]:
            raise StateError(file, f"corrupt ({'; '.join(problems)}); {_RECOVERY}")
        try:
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StateError(file, "SQLite refused WAL mode")
            db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            _migrate(db, version, migrations)
        except sqlite3.Error as exc:
            raise StateError(file, f"cannot prepare the state file: {exc}") from None

    def close(self) -> None:
        """Checkpoint, close the database and release the directory lock (idempotent)."""
        if self._lock < 0:
            return
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock)
        self._lock = -1

    # -- identity ---------------------------------------------------------------------------------
    def bind(self, agent: str) -> None:
        """Tie the file to ``agent`` (the local SPIFFE ID) on first use; refuse another agent's file.

        Raises:
            StateError: the file belongs to another SPIFFE ID (the message says whether the trust
                domain differs too), or the write failed.
        """
        stored = dict(self._query("SELECT key, value FROM meta"))
        owner = stored.get("agent")
        if owner == agent:
            return
        if owner is not None:
            theirs, ours = _trust_domain(owner), _trust_domain(agent)
            where = f"trust domain {theirs}, this sidecar is in {ours}" if theirs != ours else "same trust domain"
            raise StateError(
                self._file, f"belongs to agent {owner} ({where}), not to {agent}: refused, not reset; {_RECOVERY}"
            )
        self._write(
            [
                ("INSERT INTO meta VALUES (?, ?)", ("agent", agent)),
                ("INSERT INTO meta VALUES (?, ?)", ("trust_domain", _trust_domain(agent))),
                ("INSERT INTO meta VALUES (?, ?)", ("created_at", str(int(time.time())))),
            ]
        )

    def agent(self) -> str | None:
        """The SPIFFE ID the file belongs to (``None`` before :meth:`bind`)."""
        rows = self._query("SELECT value FROM meta WHERE key = 'agent'")
        return str(rows[0][0]) if rows else None

    # -- the hot path ------------------------------------------------------------------------------
    def save_counters(self, counters: Mapping[BudgetKey, int]) -> None:
        """Store these counter values, committed before returning (one statement, one transaction).

        Implements :class:`sidecar.policy.budget.CounterJournal`.

        Raises:
            StateError: the write failed (e.g. the disk is full).
        """
        sql = self._upserts.get(len(counters))
        if sql is None:
            rows = ", ".join(["(?, ?, ?)"] * len(counters))
            sql = f"INSERT INTO budget VALUES {rows} ON CONFLICT (task_id, counter) DO UPDATE SET used = excluded.used"  # noqa: S608 - placeholders only
            self._upserts[len(counters)] = sql
        names = self._names
        params: list[object] = []
        for key, used in counters.items():
            name = names.get(key)
            if name is None:
                name = names[key] = _counter_text(key)
            params += (key[0], name, used)
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StateError(self._file, f"cannot write the call counters: {exc}") from None

    # -- loading and saving --------------------------------------------------------------------------
    def load(self) -> tuple[Remembered, dict[BudgetKey, int]]:
        """Everything stored: the carried state and the counters.

        Raises:
            StateError: a row does not have the shape this version writes.
        """
        try:
            budget = self._query("SELECT task_id, counter, used FROM budget")
            counters = {_key(t, c): int(used) for t, c, used in budget}
            delegated = {
                child: DelegatedChild(
                    parent,
                    float(expires_at),
                    tuple((_key(*item[:2]), int(item[2])) for item in json.loads(reserved)),
                    str(token),
                )
                for child, parent, expires_at, reserved, token in self._query(
                    "SELECT child_id, parent_id, expires_at, reserved, token FROM delegation"
                )
            }
            remembered = Remembered(
                anchors={
                    t: (float(a), float(e)) for t, a, e in self._query("SELECT task_id, first_seen, ends FROM task")
                },
                posted=dict(self._query("SELECT task_id, token FROM posted_grant")),
                own_revoked={t: int(at) for t, at in self._query("SELECT task_id, revoked_at FROM own_revocation")},
                received=self._received_all(),
                delegated=delegated,
            )
        except (ValueError, TypeError, IndexError) as exc:
            raise StateError(self._file, f"a stored row is malformed ({exc}); {_RECOVERY}") from None
        return remembered, counters

    def received(self, source: str) -> tuple[RevocationList, ...]:
        """The revocation lists received from ``source`` (e.g. ``file:/etc/…/revocations.jwt``)."""
        return self._received_all(source).get(source, ())

    def save_received(self, source: str, lists: Iterable[RevocationList]) -> None:
        """Replace what is stored for ``source`` with ``lists`` (one transaction).

        Raises:
            StateError: the write failed.
        """
        self._write(self._received_ops(source, tuple(lists)))

    def save(self, before: Remembered, after: Remembered) -> None:
        """Write the difference between two carried states in one transaction (removing a task's
        anchor removes its counters).

        Raises:
            StateError: the write failed (nothing was written).
        """
        ops: list[tuple[str, tuple[object, ...]]] = []
        for task_id, (first, ends) in after.anchors.items():
            if before.anchors.get(task_id) != (first, ends):
                ops.append(("INSERT OR REPLACE INTO task VALUES (?, ?, ?)", (task_id, first, ends)))
        for task_id in before.anchors.keys() - after.anchors.keys():
            ops.append(("DELETE FROM task WHERE task_id = ?", (task_id,)))
            ops.append(("DELETE FROM budget WHERE task_id = ?", (task_id,)))
            ops.append(("DELETE FROM quarantine_strike WHERE task_id = ?", (task_id,)))
        ops += _mapping_ops("posted_grant", before.posted, after.posted)
        ops += _mapping_ops("own_revocation", before.own_revoked, after.own_revoked)
        for source in before.received.keys() | after.received.keys():
            lists = after.received.get(source, ())
            if before.received.get(source, ()) != lists:
                ops += self._received_ops(source, lists)
        for child, record in after.delegated.items():
            if before.delegated.get(child) != record:
                reserved = json.dumps([[k[0], _counter_text(k), n] for k, n in record.reserved])
                ops.append(
                    (
                        "INSERT OR REPLACE INTO delegation (child_id, parent_id, expires_at, reserved, token) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (child, record.parent, record.expires_at, reserved, record.token),
                    )
                )
        for child in before.delegated.keys() - after.delegated.keys():
            ops.append(("DELETE FROM delegation WHERE child_id = ?", (child,)))
        if ops:
            self._write(ops)

    # -- the revocation feed ---------------------------------------------------------------------------
    def feed_contact(self) -> float | None:
        """POSIX seconds of the last stored contact with the revocation feed (``None``: never).

        Raises:
            StateError: the read failed.
        """
        rows = self._query("SELECT at FROM feed_contact WHERE id = 1")
        return float(rows[0][0]) if rows else None

    def save_feed_contact(self, at: float) -> None:
        """Store the time of the last contact with the revocation feed (POSIX seconds).

        Raises:
            StateError: the write failed.
        """
        self._write([("INSERT OR REPLACE INTO feed_contact VALUES (1, ?)", (at,))])

    # -- continuous verification ---------------------------------------------------------------------
    def save_actions(self, actions: Iterable[Action]) -> None:
        """Store ladder actions (an id already stored stays as it is); one transaction.

        Implements :class:`sidecar.control.ladder.LadderJournal`.

        Raises:
            StateError: the write failed.
        """
        ops: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT OR IGNORE INTO ladder_action VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    a.action_id,
                    a.kind.value,
                    str(a.target),
                    a.at,
                    a.signer,
                    int(a.root),
                    a.reason,
                    json.dumps(list(a.evidence)),
                    a.source,
                    a.token,
                ),
            )
            for a in actions
        ]
        if ops:
            self._write(ops)

    def load_actions(self) -> list[Action]:
        """Every ladder action stored, in the order of ``at``.

        Raises:
            StateError: a stored row does not have the shape this version writes.
        """
        rows = self._query("SELECT * FROM ladder_action ORDER BY at, action_id")
        try:
            return [
                Action(
                    action_id,
                    ActionKind(kind),
                    Target.parse(target),
                    float(at),
                    signer,
                    bool(root),
                    reason,
                    tuple(json.loads(evidence)),
                    source,
                    token,
                )
                for action_id, kind, target, at, signer, root, reason, evidence, source, token in rows
            ]
        except (ValueError, TypeError) as exc:
            raise StateError(self._file, f"a stored ladder action is malformed ({exc}); {_RECOVERY}") from None

    def save_strikes(self, task_id: str, strikes: Iterable[Strike]) -> None:
        """Replace the anomaly rule's strikes of ``task_id`` (one transaction).

        Implements :class:`sidecar.control.quarantine.StrikeJournal`.

        Raises:
            StateError: the write failed.
        """
        ops: list[tuple[str, tuple[object, ...]]] = [("DELETE FROM quarantine_strike WHERE task_id = ?", (task_id,))]
        ops += [
            ("INSERT OR REPLACE INTO quarantine_strike VALUES (?, ?, ?, ?)", (task_id, s.decision_id, s.at, s.reason))
            for s in strikes
        ]
        self._write(ops)

    def load_strikes(self) -> dict[str, list[Strike]]:
        """Task id -> its strikes, oldest first."""
        out: dict[str, list[Strike]] = {}
        for task_id, decision_id, at, reason in self._query("SELECT * FROM quarantine_strike ORDER BY at"):
            out.setdefault(task_id, []).append(Strike(decision_id, float(at), reason))
        return out

    def save_approvals(self, approvals: Iterable[Approval], dropped: Iterable[str] = ()) -> None:
        """Insert or replace approvals and delete ``dropped`` ids, in one transaction.

        Implements :class:`sidecar.control.approvals.ApprovalJournal`.

        Raises:
            StateError: the write failed.
        """
        ops: list[tuple[str, tuple[object, ...]]] = [
            ("DELETE FROM approval WHERE approval_id = ?", (approval_id,)) for approval_id in dropped
        ]
        for a in approvals:
            call = json.dumps(
                {
                    "agent": a.call.agent,
                    "task_id": a.call.task_id,
                    "host": a.call.host,
                    "port": a.call.port,
                    "method": a.call.method,
                    "path": a.call.path,
                    "query": a.call.query,
                    "tool": a.call.tool,
                    "content": a.call.content,
                    "policy_version": a.call.policy_version,
                    "headers": a.call.headers,
                },
                ensure_ascii=False,
            )
            row = (
                a.id,
                a.call.task_id,
                a.state.value,
                call,
                a.created_at,
                a.expires_at,
                a.approved_at,
                a.approved_by,
                a.used_at,
                a.used_by,
            )
            ops.append(("INSERT OR REPLACE INTO approval VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row))
        if ops:
            self._write(ops)

    def load_approvals(self) -> list[Approval]:
        """Every approval stored, oldest first.

        Raises:
            StateError: a stored row does not have the shape this version writes.
        """
        rows = self._query("SELECT * FROM approval ORDER BY created_at, approval_id")
        try:
            return [
                Approval(
                    approval_id,
                    CallBinding(**json.loads(call)),
                    ApprovalState(state),
                    float(created_at),
                    float(expires_at),
                    approved_at,
                    approved_by,
                    used_at,
                    used_by,
                )
                for (
                    approval_id,
                    _,
                    state,
                    call,
                    created_at,
                    expires_at,
                    approved_at,
                    approved_by,
                    used_at,
                    used_by,
                ) in rows
            ]
        except (ValueError, TypeError) as exc:
            raise StateError(self._file, f"a stored approval is malformed ({exc}); {_RECOVERY}") from None

    # -- helpers ---------------------------------------------------------------------------------------
    def _received_ops(self, source: str, lists: tuple[RevocationList, ...]) -> list[tuple[str, tuple[object, ...]]]:
        ops: list[tuple[str, tuple[object, ...]]] = [("DELETE FROM received_revocation WHERE source = ?", (source,))]
        for revocations in lists:
            for task_id in sorted(revocations.ids):
                ops.append(
                    (
                        "INSERT INTO received_revocation VALUES (?, ?, ?, ?, ?)",
                        (source, revocations.signer, int(revocations.root), task_id, revocations.issued_at),
                    )
                )
        return ops

    def _received_all(self, only: str | None = None) -> dict[str, tuple[RevocationList, ...]]:
        sql = "SELECT source, signer, root, task_id, issued_at FROM received_revocation"
        rows = self._query(sql + " WHERE source = ?", (only,)) if only is not None else self._query(sql)
        grouped: dict[str, dict[tuple[str, bool], tuple[set[str], int]]] = {}
        for source, signer, root, task_id, issued_at in rows:
            ids, latest = grouped.setdefault(source, {}).setdefault((signer, bool(root)), (set(), 0))
            ids.add(task_id)
            grouped[source][(signer, bool(root))] = (ids, max(latest, int(issued_at)))
        return {
            source: tuple(
                RevocationList(signer, frozenset(ids), issued_at, root, "")
                for (signer, root), (ids, issued_at) in sorted(by_signer.items())
            )
            for source, by_signer in grouped.items()
        }

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self._db.execute(sql, params))
        except sqlite3.Error as exc:
            raise StateError(self._file, f"cannot read: {exc}") from None

    def _write(self, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in ops:
                    db.execute(sql, params)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateError(self._file, f"cannot write: {exc}") from None


def _mapping_ops(
    table: str, before: Mapping[str, object], after: Mapping[str, object]
) -> list[tuple[str, tuple[object, ...]]]:
    """Upserts and deletes turning ``before`` into ``after`` in a two-column ``(task_id, value)`` table."""
    ops: list[tuple[str, tuple[object, ...]]] = [
        (f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", (key, value))  # noqa: S608 - a table name of ours
        for key, value in after.items()
        if before.get(key) != value
    ]
    ops += [(f"DELETE FROM {table} WHERE task_id = ?", (key,)) for key in before.keys() - after.keys()]  # noqa: S608
    return ops


def _trust_domain(spiffe_id: str) -> str:
    try:
        return str(parse_spiffe_id(spiffe_id).trust_domain)
    except SpiffeIdError:
        return "?"
