"""The active configuration: built once, swapped atomically, reloaded without restart.

The :class:`Runtime` holds the active :class:`~sidecar.runtime.snapshot.Snapshot`, the state that
outlives it (the :class:`~sidecar.runtime.snapshot.CarriedState`, the call budgets, the token
cache) and decides each request against the snapshot it reads once. With a
:class:`~sidecar.state.StateStore` (``state.path``) it starts from the stored state, refuses a file
that belongs to another agent, and writes every change there before it takes effect: a new
snapshot's carried state before the swap, a call's budget charge before the allow.

Continuous verification lives here too, next to the budgets: the freeze :class:`~sidecar.control.Ladder`
(actions from ``ladder.files``, the control API and the runtime's own quarantines; the task id ->
block map the decision reads is recomputed whenever the policy or the actions change), the anomaly
rule's strikes (:class:`~sidecar.control.AnomalyDetector`, fed after each decision) and the
:class:`~sidecar.control.ApprovalBook` the decision consults. Control records (a quarantine, a
received action) go to :attr:`Runtime.on_record` (the decision log); a quarantine tripped by a call
is recorded right after that call's record (``Decision.followups``).

A reload first asks whether a rebuild could change anything: the fingerprints of every file the
active snapshot read (and of every file the last failed attempt read) are compared with the files
now, and nothing is parsed when they match. So while ``sidecar.yaml`` is invalid, other files
written in its directory (a log next to it) cost one read each, not a parse and another
``config_reload_failed``; and a file restored to the bytes of the active configuration clears the
stale error. Otherwise the configuration is read and parsed once, a complete new snapshot is built
and swapped in with one assignment; if anything fails (YAML, schema, unreadable key or credential
file) the previous snapshot stays active and the error is logged.
"""

from __future__ import annotations

import collections
import secrets
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from sidecar.config.loader import LoadedConfig, parse_config, read_config_bytes
from sidecar.control.approvals import ApprovalBook
from sidecar.control.documents import Action, ActionKind, Target, TargetKind, sign_action
from sidecar.control.ladder import Ladder, describe
from sidecar.control.quarantine import AnomalyDetector, effective_rule
from sidecar.decision import AuthzRequest, Decision, Direction, Protocol, Reason
from sidecar.dns.answers import Address, AddressBook
from sidecar.errors import BundleDetail, ConfigError, ErrorCode, StateError, SvidDetail
from sidecar.identity.state import IdentityLoadError, IdentityState
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.connection import decide_connect, decide_connection
from sidecar.policy.engine import decide_egress, dry_run
from sidecar.policy.ingress import IdentityContext, decide_ingress
from sidecar.policy.model import Task, task_state
from sidecar.policy.names import decide_name
from sidecar.runtime.inputs import DISK, FileSource, InputRecorder, Inputs, inputs_unchanged
from sidecar.runtime.snapshot import CarriedState, Snapshot, build_snapshot
from sidecar.state.store import StateStore
from sidecar.tokens.minter import TokenCache

__all__ = ["FeedGate", "Runtime"]

_log = structlog.get_logger("agent_authz.runtime")


class FeedGate(typing.Protocol):
    """What the runtime asks the revocation feed (:class:`sidecar.authority.client.FeedStatus`)."""

    def stale_scope(self, now: float) -> str | None:
        """``delegated`` or ``all`` while the feed is stale (what to deny), else ``None``."""
        ...


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What a build read (files and carried state), to tell whether repeating it could differ."""

    inputs: Inputs
    key: object


class Runtime:
    """Holds the active :class:`Snapshot` and the state that outlives it.

    Args:
        config_path: path to ``sidecar.yaml``.
        loaded: the configuration already read from ``config_path`` (``serve`` parses it once at start
            and hands it to every part); read here when omitted.
        clock: returns POSIX seconds (tests pass a fake clock).
        defer: schedules background token refreshes (``loop.call_soon``); ``None`` refreshes inline.
        workload_identity: the first state from the Workload API, when ``identity.source`` is
            ``workload_api`` (later states arrive through :meth:`set_identity`).
        carried: the state to start from (a fresh process without ``store`` starts from nothing).
        files: where configured files are read from (the disk).
        store: the durable state: the carried state and the counters start from it, and every
            change is written to it (its owner, closing it, is the caller).

    Attributes:
        snapshot: the active snapshot (read it once per use: a reload may swap it at any time).
        budgets: call counters (survive reloads).
        tokens: minted tokens (survive reloads).
        addresses: the addresses the DNS proxy answered per name (bind ``tls: passthrough``).
        reloads: snapshots swapped in after the first.
        reload_failures_by_code: rejected reloads by error code (``ConfigError.code``).
        last_error: why the last reload failed; ``None`` once the files are good again.
        last_identity_error: why the last identity update (files or Workload API) was refused
            (``"<sub-code>: <reason>"``), or ``None`` once a good one replaced it.
        identity_rejections: refused identity updates by ``(source, sub-code)`` (the previous
            identity stayed active).
        ladder: the freeze/unfreeze/kill actions honoured here.
        strikes: the anomaly rule's counted denials.
        approvals: the approval book.
        on_record: where control records go (set by ``serve``: the decision log); records made
            before it is set are kept and handed over when it is (:meth:`set_recorder`).
        quarantines: tasks frozen by the anomaly rule, by mode (``freeze``, ``dry_run``).
        action_listeners: called with each of this sidecar's own actions (a quarantine) once it is in
            force and published (``serve`` forwards them to the cluster authority).
        feed: the cluster authority's revocation feed (``grants.revocation_feed``), set by ``serve``;
            while it is stale, :meth:`decide` denies ``revocation_feed_stale``.

    Raises:
        ConfigError: the initial configuration is invalid (there is no previous one to keep).
        StateError: ``store`` belongs to another agent, or cannot be written.
        ValueError: both ``carried`` and ``store`` were given.
    """

    def __init__(
        self,
        config_path: str | Path,
        *,
        loaded: LoadedConfig | None = None,
        clock: Callable[[], float] = time.time,
        defer: Callable[[Callable[[], None]], Any] | None = None,
        workload_identity: IdentityState | None = None,
        carried: CarriedState | None = None,
        files: FileSource = DISK,
        store: StateStore | None = None,
    ) -> None:
        if store is not None and carried is not None:
            raise ValueError("pass the carried state or the store it is loaded from, not both")
        self.config_path = Path(config_path)
        self.clock = clock
        self.files = files
        self.store = store
        if store is not None:
            remembered, counters = store.load()
            carried = CarriedState.from_remembered(remembered)
            self.budgets = BudgetLedger(counters, journal=store)
            self.ladder = Ladder(store.load_actions(), journal=store)
            self.strikes = AnomalyDetector(store.load_strikes(), journal=store)
            approvals = store.load_approvals()
        else:
            self.budgets = BudgetLedger()
            self.ladder = Ladder()
            self.strikes = AnomalyDetector()
            approvals = []
        self.on_record: Callable[[Decision], None] | None = None
        self._unrecorded: list[Decision] = []
        self._refused_seen: set[str] = set()
        self._blocks: dict[str, tuple[Reason, str]] = {}
        self.quarantines: collections.Counter[str] = collections.Counter()
        self.action_listeners: list[Callable[[Action], None]] = []
        self.tokens = TokenCache()
        self._defer = defer
        self._listeners: list[Callable[[Snapshot], None]] = []
        self.reloads = 0
        self.reload_failures_by_code: collections.Counter[ErrorCode] = collections.Counter()
        self.last_error: str | None = None
        self.last_identity_error: str | None = None
        self.identity_rejections: collections.Counter[tuple[str, SvidDetail | BundleDetail]] = collections.Counter()
        self.feed: FeedGate | None = None
        start = carried if carried is not None else CarriedState()
        self._carried = replace(start, identity=workload_identity) if workload_identity is not None else start
        self._failed: _Attempt | None = None
        self._stored = self._carried.remembered()
        recorder = InputRecorder(files)
        self.snapshot: Snapshot = self._build(self._carried, recorder, loaded)
        dns_settings = self.snapshot.loaded.settings.dns
        self.addresses = AddressBook(dns_settings.binding_min_ttl if dns_settings is not None else 60.0)
        self.approvals = ApprovalBook(self.snapshot.loaded.settings.approvals, approvals, journal=store)
        if store is not None:
            store.bind(self.snapshot.policy.agent)  # another agent's file: refused before anything is written
        self._commit(self.snapshot)
        self._absorb(self.snapshot)
        self._active = _Attempt(self.snapshot.inputs, self._carried.rebuild_key)

    # -- building ----------------------------------------------------------------------------------
    def _build(self, carried: CarriedState, recorder: InputRecorder, loaded: LoadedConfig | None = None) -> Snapshot:
        """Read and parse ``sidecar.yaml`` once (unless given) and build a snapshot with ``carried``."""
        if loaded is None:
            loaded = parse_config(self.config_path, read_config_bytes(self.config_path, fetch=recorder.fetch))
        return build_snapshot(
            loaded,
            carried,
            now=self.clock(),
            recorder=recorder,
            tokens=self.tokens,
            clock=self.clock,
            defer=self._defer,
        )

    def _persist(self, carried: CarriedState) -> None:
        """Write what changed in ``carried`` since the last write to the store (if any).

        Raises:
            StateError: the write failed (the store keeps the previous state).
        """
        if self.store is None:
            return
        remembered = carried.remembered()
        self.store.save(self._stored, remembered)
        self._stored = remembered

    def _commit(self, snapshot: Snapshot, *, strict: bool = True) -> None:
        """Keep what ``snapshot`` carries forward (durably first); drop counters of tasks no longer
        remembered and tokens of tasks it no longer has.

        Args:
            snapshot: the snapshot being swapped in.
            strict: a store that cannot be written stops the change (``StateError``). Otherwise
                (a reload: new files, e.g. a revocation list, must apply even so) the failure is
                logged and the change applies in memory; the next successful write catches up.

        Raises:
            StateError: with ``strict``, the store could not be written (nothing changed).
        """
        carried = replace(snapshot.carried, identity=self._carried.identity)
        try:
            self._persist(carried)
        except StateError as exc:
            if strict:
                raise
            _log.error("state_write_failed", file=exc.file, reason=exc.reason, code=exc.code)
        self._carried = carried
        self.budgets.retain(carried.first_seen)
        tasks = snapshot.policy.tasks_by_id
        self.tokens.retain({(t.id, t.fingerprint) for t in tasks.values()})

    def _swap(self, snapshot: Snapshot, previous: Snapshot, *, strict: bool = True) -> bool:
        self._commit(snapshot, strict=strict)
        self._active = _Attempt(snapshot.inputs, snapshot.carried.rebuild_key)
        self._failed = None
        self.last_error = None
        self._files_identity_good(snapshot)
        if snapshot.digest == previous.digest:
            return False
        settings, before = snapshot.loaded.settings, previous.loaded.settings
        if settings.decision_log != before.decision_log:
            _log.warning("decision_log_change_needs_restart", file=str(self.config_path))
        if settings.intercept != before.intercept:
            _log.warning("intercept_change_needs_restart", file=str(self.config_path))
        if settings.viewer != before.viewer:
            _log.warning("viewer_change_needs_restart", file=str(self.config_path))
        if settings.state != before.state:
            _log.warning("state_change_needs_restart", file=str(self.config_path))
        self.snapshot = snapshot
        self.approvals.settings = settings.approvals
        self._absorb(snapshot)
        self.reloads += 1
        for listener in self._listeners:
            listener(snapshot)
        _log.info(
            "config_reloaded",
            file=str(self.config_path),
            digest=snapshot.digest[:16],
            tasks=len(snapshot.policy.tasks_by_id),
        )
        return True

    @property
    def carried(self) -> CarriedState:
        """The state the next build starts from."""
        return self._carried

    @property
    def reload_failures(self) -> int:
        """Reloads rejected so far (the last good configuration stayed active)."""
        return sum(self.reload_failures_by_code.values())

    @property
    def watched(self) -> frozenset[Path]:
        """Files whose change may change the outcome of a reload: those the active snapshot read, and
        those the last failed attempt read (a key file it missed may appear)."""
        failed = self._failed.inputs if self._failed is not None else {}
        return frozenset(self._active.inputs) | frozenset(failed)

    def _unchanged(self, attempt: _Attempt, key: object, known: Inputs) -> bool:
        return attempt.key == key and inputs_unchanged(self.files, attempt.inputs, known)

    def reload(self) -> bool:
        """Re-read the configuration and swap it in if it is valid and changed.

        ``sidecar.yaml`` is read once: its bytes are fingerprinted for the short-circuit and, when
        something changed, parsed once.

        Returns:
            ``True`` when a new snapshot is active. On error the previous snapshot stays active,
            ``last_error`` holds the message and a ``config_reload_failed`` event is logged - once
            per distinct set of inputs: the same bad files are not parsed again.
        """
        key = self._carried.rebuild_key
        recorder = InputRecorder(self.files)
        unreadable: ConfigError | None = None
        try:
            raw = read_config_bytes(self.config_path, fetch=recorder.fetch)
        except ConfigError as exc:
            raw, unreadable = b"", exc
        read_now = recorder.inputs()  # the config file's fingerprint, as just read
        if self._unchanged(self._active, key, read_now):
            if self._failed is not None:  # back to the active configuration's files: the error is stale
                self._failed = None
                self.last_error = None
                self._files_identity_good(self.snapshot)
                _log.info("config_restored", file=str(self.config_path), digest=self.snapshot.digest[:16])
            return False
        if self._failed is not None and self._unchanged(self._failed, key, read_now):
            return False
        previous = self.snapshot
        try:
            if unreadable is not None:
                raise unreadable
            snapshot = self._build(self._carried, recorder, parse_config(self.config_path, raw))
        except ConfigError as exc:
            self._failed = _Attempt(recorder.inputs(), key)
            self.reload_failures_by_code[exc.code] += 1
            self.last_error = str(exc)
            _log.error("config_reload_failed", file=exc.file, field=exc.field, reason=exc.reason, code=exc.code)
            if isinstance(exc, IdentityLoadError):
                self.identity_rejected("files", exc.detail, f"{exc.reason} ({exc.field})")
            return False
        return self._swap(snapshot, previous, strict=False)

    def apply(self, carried: CarriedState) -> Snapshot:
        """Build with ``carried`` (the configuration re-read from disk) and swap it in, or raise.

        The task API uses it to make a posted grant or a revocation effective at once. A failure
        changes nothing (it is the caller's error, not a reload failure).

        Raises:
            ConfigError: the build failed (the message says why).
            StateError: the new state could not be stored (nothing changed).
        """
        previous = self.snapshot
        snapshot = self._build(replace(carried, identity=self._carried.identity), InputRecorder(self.files))
        self._swap(snapshot, previous)
        return self.snapshot

    def remember(self, carried: CarriedState) -> None:
        """Carry ``carried`` into the next build without rebuilding now (e.g. a delegated child's id,
        or a revocation to apply on the next successful reload), and store it.

        It takes effect in memory even when the store fails (what is remembered this way only ever
        restricts: a revocation, a child this sidecar may revoke).

        Raises:
            StateError: the store could not be written (the change holds until a restart).
        """
        self._carried = replace(carried, identity=self._carried.identity)
        self._persist(self._carried)

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener(snapshot)`` after each new snapshot is swapped in (on the reloading thread)."""
        self._listeners.append(listener)

    def set_identity(self, state: IdentityState) -> bool:
        """Swap in a new identity from the Workload API (rotation without restart).

        ``state.problems`` (refused updates the source kept this state through) become
        ``last_identity_error``; a state without problems clears it.

        Returns:
            ``False`` (and records ``svid_spiffe_id_changed`` with :meth:`identity_rejected`) when the
            SVID names another SPIFFE ID than the one the policy was compiled for; the previous
            identity then stays active.
        """
        snapshot = self.snapshot
        if state.svid.spiffe_id != snapshot.policy.agent:
            self.identity_rejected(
                state.source,
                SvidDetail.SVID_SPIFFE_ID_CHANGED,
                f"SVID for {state.svid.spiffe_id}, expected {snapshot.policy.agent}",
            )
            return False
        self._carried = replace(self._carried, identity=state)
        self.last_identity_error = "; ".join(state.problems) or None
        self.snapshot = replace(
            snapshot,
            identity=IdentityContext.build(state, snapshot.ingress),
            carried=replace(snapshot.carried, identity=state),
        )
        return True

    def identity_rejected(self, source: str, detail: SvidDetail | BundleDetail, message: str) -> None:
        """Record a refused identity update (the previous identity stays active).

        Counted per ``(source, detail)`` for ``agent_authz_identity_updates_rejected_total`` and shown
        as ``identity.last_error`` in ``/readyz`` until a good update arrives; logged as
        ``identity_rejected``.

        Args:
            source: ``files`` or ``workload_api``.
            detail: the sub-code.
            message: the human-readable reason (``detail`` is prefixed unless it starts with it).
        """
        self.identity_rejections[(source, detail)] += 1
        self.last_identity_error = message if message.startswith(detail) else f"{detail}: {message}"
        _log.error("identity_rejected", source=source, detail=detail, reason=self.last_identity_error)

    def _files_identity_good(self, snapshot: Snapshot) -> None:
        """``snapshot`` loaded its identity from valid ``identity.files``: an earlier refusal is over."""
        identity = snapshot.loaded.settings.identity
        if identity is not None and identity.source == "files":
            self.last_identity_error = None

    # -- continuous verification --------------------------------------------------------------------
    @property
    def blocks(self) -> dict[str, tuple[Reason, str]]:
        """Task id -> ``(task_quarantined | task_revoked, detail)`` for the tasks the ladder blocks now."""
        return self._blocks

    def set_recorder(self, record: Callable[[Decision], None]) -> None:
        """Send control records to ``record`` from now on (and the ones made before, first)."""
        self.on_record = record
        waiting, self._unrecorded = self._unrecorded, []
        for decision in waiting:
            record(decision)

    def record(self, decision: Decision) -> None:
        """Record a control decision (kept until :meth:`set_recorder` when there is no recorder yet)."""
        if self.on_record is None:
            self._unrecorded.append(decision)
        else:
            self.on_record(decision)

    def control_record(
        self, reason: Reason, *, action: Action | Mapping[str, object] | None = None, **fields: Any
    ) -> Decision:
        """A ``control`` decision (a record of an action or an approval) for :meth:`record`."""
        base: dict[str, Any] = {"agent": self.snapshot.policy.agent}
        if isinstance(action, Action):
            base["action"] = action.record()
            if action.target.kind is not TargetKind.AGENT:
                base["task_id"] = action.target.id
        elif action is not None:
            base["action"] = dict(action)
        base.update(fields)
        allow = reason not in (Reason.NOT_AUTHORIZED, Reason.BAD_REQUEST)
        status = 200 if allow else (400 if reason is Reason.BAD_REQUEST else 403)
        return Decision(allow, reason, status, secrets.token_hex(16), direction=Direction.CONTROL, **base)

    def add_actions(self, actions: Iterable[Action], *, strict: bool = True) -> list[Action]:
        """Honour ``actions`` (stored first), recompute the blocks, record each new one.

        Args:
            actions: verified actions (their authority over each task is judged per task).
            strict: a store that cannot be written refuses them (``StateError``); otherwise (a
                reload: restrictive actions must apply) the failure is logged and they apply in memory.

        Returns:
            The actions that were new.

        Raises:
            StateError: with ``strict``, the store could not be written (nothing changed).
        """
        new = self.ladder.add(actions, strict=strict)
        if new:
            self._refresh_blocks()
            reasons = {ActionKind.FREEZE: Reason.TASK_FROZEN, ActionKind.UNFREEZE: Reason.TASK_UNFROZEN}
            for action in new:
                if action.source != "own":
                    reason = reasons.get(action.kind, Reason.TASK_KILLED)
                    self.record(self.control_record(reason, action=action, detail=describe(action)))
        return new

    def _refresh_blocks(self) -> None:
        """Recompute the blocks for the active policy; an unfrozen task's strikes start over."""
        before = self._blocks
        after = self.ladder.blocks(self.snapshot.policy)
        lifted = [t for t, (reason, _) in before.items() if reason is Reason.TASK_QUARANTINED and t not in after]
        self._blocks = after
        if lifted:
            try:
                self.strikes.clear(lifted)
            except StateError as exc:
                _log.error("state_write_failed", file=exc.file, reason=exc.reason, code=exc.code)

    def _absorb(self, snapshot: Snapshot) -> None:
        """After a swap: honour the actions the build read, record refused lines, recompute the blocks."""
        self._refresh_blocks()
        self.add_actions(snapshot.actions, strict=False)
        for refused in snapshot.refused_actions:
            key = f"{refused.source}#{refused.fingerprint}"
            if key in self._refused_seen:
                continue
            self._refused_seen.add(key)
            _log.warning(
                "ladder_action_refused", source=refused.source, line=refused.fingerprint, reason=str(refused.error)
            )
            self.record(
                self.control_record(
                    Reason.NOT_AUTHORIZED,
                    detail=f"{refused.source}: line {refused.fingerprint}: {refused.error}",
                    action={"source": refused.source, "line": refused.fingerprint},
                )
            )

    def _own_action(self, kind: ActionKind, target: Target, *, reason: str, evidence: tuple[str, ...]) -> Action:
        """An action of this sidecar, signed with its agent's X.509-SVID when it has one."""
        now = self.clock()
        snapshot = self.snapshot
        agent = snapshot.policy.agent
        token = ""
        action_id = secrets.token_urlsafe(16)
        if snapshot.identity is not None:
            svid = snapshot.identity.state.svid
            token = sign_action(
                kind,
                target,
                svid.private_key,
                issuer=agent,
                at=now,
                reason=reason,
                evidence=evidence,
                x5c=list(svid.chain),
                jti=action_id,
            )
        return Action(action_id, kind, target, round(now, 3), agent, False, reason, evidence, "own", token)

    def publish_actions(self) -> None:
        """Write this sidecar's own signed actions to ``ladder.publish`` (atomically), if configured."""
        target = self.snapshot.loaded.settings.ladder.publish
        if target is None:
            return
        lines = [a.token for a in self.ladder.own() if a.token]
        path = self.snapshot.loaded.resolve(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            tmp.replace(path)  # atomic: watchers never read half a file
        except OSError as exc:
            _log.error("ladder_publish_failed", path=str(path), reason=str(exc))

    def _watch(self, decision: Decision, snapshot: Snapshot) -> Decision:
        """Count a denial of an out-of-task kind; freeze (or, in dry run, record ``would_quarantine``)
        each task whose anomaly rule it trips.

        A denial judged against a task of the local agent counts against that task and every task
        it was delegated from that this agent holds here too (a self-delegation adds no authority,
        so it cannot start a fresh count). A denial judged against no task (a host no task names
        while the agent holds several, a ``CONNECT``, a DNS name) counts against each active task
        of the local agent; the record names the task when there is exactly one. A refused DNS name
        that is an allowed name followed by more labels (a resolver's search-list expansion) counts
        against nothing.
        """
        if decision.allow and not decision.dry_run:
            return decision
        spec = snapshot.loaded.settings.quarantine
        reason = decision.would_reason if decision.dry_run else decision.reason
        if reason is None or reason not in spec.reasons:
            return decision
        policy = snapshot.policy
        if decision.protocol is Protocol.DNS and decision.task_id is not None:
            return decision  # a name of a task that expired, is spent or frozen: no probe
        if decision.task_id is None:
            if decision.protocol is Protocol.DNS and self._expands_allowed_name(decision.host, snapshot):
                return decision
            targets = self._active_local_tasks(snapshot)
            if len(targets) == 1:
                decision = replace(decision, task_id=targets[0].id)
        else:
            task = policy.tasks_by_id.get(decision.task_id)
            if task is None or task.agent != policy.agent:
                return decision
            held = (policy.tasks_by_id.get(ancestor) for ancestor, agent, _ in task.lineage[1:] if agent == task.agent)
            targets = [task, *(t for t in held if t is not None)]
        for task in targets:
            decision = self._strike(decision, task, reason, snapshot)
        return decision

    def _active_local_tasks(self, snapshot: Snapshot) -> list[Task]:
        now = self.clock()
        feed = self.feed
        stale = feed.stale_scope(now) if feed is not None else None
        local = snapshot.policy.tasks_by_agent.get(snapshot.policy.agent, ())
        return [t for t in local if task_state(t, now, stale, blocks=self._blocks) is None]

    @staticmethod
    def _expands_allowed_name(name: str, snapshot: Snapshot) -> bool:
        """Whether ``name`` is a name the agent may resolve with labels after it (``api.example.com``
        asked as ``api.example.com.corp.example``, as a resolver does for each search domain)."""
        policy = snapshot.policy
        dot = name.rfind(".")
        while dot > 0:
            prefix = name[:dot]
            if "." in prefix and (snapshot.dns_names.matches(prefix) or policy.tasks_for_host(policy.agent, prefix)):
                return True
            dot = name.rfind(".", 0, dot)
        return False

    def _strike(self, decision: Decision, task: Task, reason: Reason, snapshot: Snapshot) -> Decision:
        settings = snapshot.loaded.settings
        spec = settings.quarantine
        rule = effective_rule(spec, task)
        if rule is None:
            return decision
        now = self.clock()
        try:
            evidence = self.strikes.count(task.id, rule, decision_id=decision.decision_id, reason=reason, now=now)
        except StateError as exc:  # counted in memory all the same
            _log.error("state_write_failed", file=exc.file, reason=exc.reason, code=exc.code)
            return decision
        if evidence is None:
            return decision
        ids = tuple(strike.decision_id for strike in evidence)
        why = f"{len(ids)} out-of-task denials within {rule.window:g}s (threshold {rule.threshold})"
        target = Target(TargetKind.SUBTREE, task.id)
        if spec.dry_run or settings.dry_run:
            self.quarantines["dry_run"] += 1
            action = {"kind": "freeze", "target": str(target), "evidence": list(ids), "reason": why, "dry_run": True}
            followup = self.control_record(
                Reason.WOULD_QUARANTINE, task_id=task.id, detail=f"would freeze {target}: {why}", action=action
            )
            return replace(decision, followups=(*decision.followups, followup))
        own = self._own_action(ActionKind.FREEZE, target, reason=why, evidence=ids)
        self.add_actions([own], strict=False)
        self.quarantines["freeze"] += 1
        self.publish_actions()
        for listener in self.action_listeners:
            listener(own)
        _log.warning("task_quarantined", task_id=task.id, evidence=list(ids), action_id=own.action_id)
        followup = self.control_record(Reason.TASK_FROZEN, action=own, detail=describe(own))
        return replace(decision, followups=(*decision.followups, followup))

    # -- the request path ------------------------------------------------------------------------
    def decide(self, request: AuthzRequest, decision_id: str) -> Decision:
        """Decide ``request`` against the active snapshot (read once, so a swap mid-call is harmless).

        With ``dry_run: true`` the policy's decision is turned into an allow by
        :func:`~sidecar.policy.engine.dry_run`. A budget charge the store cannot write is an
        ``internal_error`` deny (nothing is spent; dry run does not turn it into an allow).
        """
        try:
            return self._decide(request, decision_id)
        except StateError as exc:
            _log.error("state_write_failed", file=exc.file, reason=exc.reason, decision_id=decision_id)
            detail = "the call counter could not be stored"
            return Decision(False, Reason.INTERNAL_ERROR, 403, decision_id, detail, request.direction)

    def _decide(self, request: AuthzRequest, decision_id: str) -> Decision:
        snapshot = self.snapshot
        blocks = self._blocks
        now = self.clock()
        feed = self.feed
        stale = feed.stale_scope(now) if feed is not None else None
        if request.protocol is not Protocol.HTTP:
            pins, answered = snapshot.pins, self.addresses

            def addresses_of(host: str) -> frozenset[Address]:
                return pins.get(host, frozenset()) | answered.addresses(host, now)

            decision = decide_connection(
                snapshot.policy,
                request,
                now=now,
                decision_id=decision_id,
                budgets=self.budgets,
                addresses_of=addresses_of,
                blocks=blocks,
                feed_stale=stale,
            )
        elif request.direction is Direction.EGRESS and request.method.upper() == "CONNECT":
            decision = decide_connect(
                snapshot.policy, request, now=now, decision_id=decision_id, blocks=blocks, feed_stale=stale
            )
        elif request.direction is Direction.EGRESS:
            identity = snapshot.identity
            bind = identity is not None and snapshot.loaded.settings.issuer.bind_to_svid
            decision = decide_egress(
                snapshot.policy,
                request,
                now=now,
                decision_id=decision_id,
                budgets=self.budgets,
                minter=snapshot.minter,
                cnf=identity.state.svid.x5t_s256 if bind and identity is not None else None,
                blocks=blocks,
                approvals=self.approvals,
                feed_stale=stale,
            )
        else:
            decision = decide_ingress(
                snapshot.ingress,
                request,
                identity=snapshot.identity,
                agent=snapshot.policy.agent,
                now=now,
                decision_id=decision_id,
            )
        decision = dry_run(decision, request.headers) if snapshot.loaded.settings.dry_run else decision
        if decision.direction is Direction.EGRESS:
            decision = self._watch(decision, snapshot)
        return decision

    def decide_dns(self, name: str, qtype: str, destination: str, decision_id: str) -> Decision:
        """Decide a DNS query of the local agent against the active snapshot
        (:func:`~sidecar.policy.names.decide_name`: a frozen task's names do not resolve either);
        dry-run lets a refused one through (``dry_run``)."""
        snapshot = self.snapshot
        now = self.clock()
        feed = self.feed
        decision = decide_name(
            snapshot.policy,
            snapshot.dns_names,
            name,
            qtype,
            now=now,
            decision_id=decision_id,
            destination=destination,
            blocks=self._blocks,
            feed_stale=feed.stale_scope(now) if feed is not None else None,
        )
        decision = dry_run(decision) if snapshot.loaded.settings.dry_run else decision
        return self._watch(decision, snapshot)

    def jwks(self) -> dict[str, Any]:
        """The JWKS document of the active keys (RFC 7517 §5)."""
        return self.snapshot.keys.jwks(self.clock())
