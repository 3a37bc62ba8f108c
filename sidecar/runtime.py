"""The active configuration: compiled once, swapped atomically, reloaded without restart.

A :class:`Snapshot` holds everything a decision reads (policy index, keys, minter). A reload builds
a complete new snapshot first and swaps it in with one assignment; if anything fails (YAML, schema,
unreadable key or credential file) the previous snapshot stays active and the error is logged.
Call budgets, token cache and ``ttl`` anchors live in the :class:`Runtime` and survive reloads.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from sidecar.config.loader import LoadedConfig, load_config, read_secret_file
from sidecar.config.schema import TaskSpec, tls_rule_conflicts
from sidecar.config.task_file import check_task_credentials, looks_like_jws, parse_task_document
from sidecar.credentials import credential_value
from sidecar.decision import AuthzRequest, Decision, Direction, Protocol
from sidecar.errors import ConfigError
from sidecar.grants.issue import DelegationRequest, delegate
from sidecar.grants.model import Grant, GrantError
from sidecar.grants.revocations import RevocationList, revoked_by, sign_revocations
from sidecar.grants.sources import GrantSet, check_grant_usable, load_grants
from sidecar.identity.state import IdentityState, load_identity_files
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.connection import decide_connection
from sidecar.policy.engine import decide_egress, dry_run
from sidecar.policy.ingress import IdentityContext, IngressPolicy, compile_ingress, decide_ingress
from sidecar.policy.model import Credential, PolicyIndex
from sidecar.tokens.keys import KeySet, SigningKey, load_signing_key
from sidecar.tokens.minter import TokenCache, TokenMinter

__all__ = ["Delegation", "Runtime", "Snapshot"]

_log = structlog.get_logger("agent_authz.runtime")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent, compiled configuration.

    Attributes:
        loaded: the validated file (its ``tasks`` dropped once compiled into ``policy``).
        policy: compiled tasks (``policy.agent`` is this agent's SPIFFE ID).
        ingress: compiled ingress rules.
        identity: this agent's SVID, the trust bundles and verifiers; ``None`` without an identity source.
        grants: the grant verifier, accepted grants and revocation lists.
        keys: signing and published keys.
        minter: token minter bound to ``keys.current``.
        digest: SHA-256 over the config file and every file it references.
        watched: files whose change triggers a reload.
    """

    loaded: LoadedConfig
    policy: PolicyIndex
    ingress: IngressPolicy
    identity: IdentityContext | None
    grants: GrantSet
    keys: KeySet
    minter: TokenMinter
    digest: str
    watched: frozenset[Path]


def _check_tls_rules(sources: list[TaskSource], intercept: bool, file: str) -> None:
    """TLS rules of all tasks (config, grants, task files) agree, and ``tls: intercept`` has its CA.

    Raises:
        ConfigError: see :func:`~sidecar.config.schema.tls_rule_conflicts`; or a ``tls: intercept``
            rule without the ``intercept`` section.
    """
    located = [(f"task {src.spec.id!r} egress[{i}]", rule) for src in sources for i, rule in enumerate(src.spec.egress)]
    conflict = tls_rule_conflicts(located)
    if conflict is not None:
        raise ConfigError(file, "tasks", conflict)
    if not intercept:
        for where, rule in located:
            if rule.tls == "intercept":
                raise ConfigError(
                    file, "tasks", f"{where}: 'tls: intercept' needs the 'intercept' section (the pod CA)"
                )


@dataclass(frozen=True, slots=True)
class Delegation:
    """A sub-grant this sidecar issued (``POST /v1/tasks/{id}/delegate``).

    Attributes:
        spec: the child task (``id`` is ``<parent id>/<name>``, ``agent`` the sub-agent).
        parent: the delegating task's id.
        txn: the root grant's id.
        ancestors: ids from the root to the parent.
        issued_at: POSIX seconds.
    """

    spec: TaskSpec
    parent: str
    txn: str
    ancestors: tuple[str, ...]
    issued_at: float


class _Reader:
    """Reads files named in one configuration, hashing them (change detection) and noting them (watching)."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.digest = hashlib.sha256(loaded.digest.encode())
        self.watched: set[Path] = {loaded.source}

    def watch(self, path: Path) -> None:
        self.watched.add(self.loaded.resolve(path))

    def read(self, path: Path, field: str) -> bytes:
        resolved = self.loaded.resolve(path)
        data = read_secret_file(resolved, file=str(self.loaded.source), field=field)
        self.digest.update(field.encode() + b"\0" + data + b"\0")
        self.watched.add(resolved)
        return data

    def read_optional(self, path: Path, field: str, limit: int = 1024 * 1024) -> bytes:
        """Like :meth:`read`, but an empty file is fine (an unset annotation mounts as an empty file)."""
        resolved = self.loaded.resolve(path)
        try:
            with resolved.open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise ConfigError(str(self.loaded.source), field, f"cannot read {resolved}: {exc.strerror}") from None
        if len(data) > limit:
            raise ConfigError(str(self.loaded.source), field, f"{resolved} is larger than {limit} bytes")
        self.digest.update(field.encode() + b"\0" + data + b"\0")
        self.watched.add(resolved)
        return data


class Runtime:
    """Holds the active :class:`Snapshot` and the state that outlives it.

    Args:
        config_path: path to ``sidecar.yaml``.
        clock: returns POSIX seconds (tests pass a fake clock).
        defer: schedules background token refreshes (``loop.call_soon``); ``None`` refreshes inline.
        workload_identity: the first state from the Workload API, when ``identity.source`` is
            ``workload_api`` (later states arrive through :meth:`set_identity`).

    Raises:
        ConfigError: the initial configuration is invalid (there is no previous one to keep).
    """

    def __init__(
        self,
        config_path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        defer: Callable[[Callable[[], None]], Any] | None = None,
        workload_identity: IdentityState | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self._workload_identity = workload_identity
        self.last_identity_error: str | None = None
        self._posted: dict[str, str] = {}
        self._own_revoked: dict[str, int] = {}
        self._issued: dict[str, Delegation] = {}
        self._published: str | None = None
        self.clock = clock
        self.budgets = BudgetLedger()
        self.tokens = TokenCache()
        self._defer = defer
        self._first_seen: dict[str, float] = {}
        self._retired: tuple[tuple[SigningKey, float], ...] = ()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self.snapshot: Snapshot = self._build(None)
        self._last_files_digest = self._files_digest(self.snapshot)

    def _build(self, previous: Snapshot | None) -> Snapshot:
        loaded = load_config(self.config_path)
        settings = loaded.settings
        issuer = settings.issuer
        reader = _Reader(loaded)
        name = str(loaded.source)

        current = load_signing_key(
            reader.read(issuer.signing_key, "issuer.signing_key"),
            issuer.algorithm,
            file=name,
            field="issuer.signing_key",
        )
        next_key = None
        if issuer.next_signing_key is not None:
            pem = reader.read(issuer.next_signing_key, "issuer.next_signing_key")
            next_key = load_signing_key(pem, issuer.algorithm, file=name, field="issuer.next_signing_key")

        identity = self._load_identity(loaded, reader)
        agent = self._agent(loaded, identity)
        ingress = compile_ingress(settings, agent)
        identity_ctx = IdentityContext.build(identity, ingress.audiences) if identity is not None else None

        named = {
            cred_name: Credential(
                spec.header,
                credential_value(
                    reader.read(spec.file, f"credentials.{cred_name}.file"),
                    spec.prefix,
                    file=name,
                    field=f"credentials.{cred_name}.file",
                ),
            )
            for cred_name, spec in settings.credentials.items()
        }
        sources: list[TaskSource] = []
        for t_index, task in enumerate(settings.tasks):
            creds: dict[int, Credential] = {}
            for r_index, rule in enumerate(task.egress):
                if isinstance(rule.credential, str):
                    creds[r_index] = named[rule.credential]
                elif rule.credential is not None:
                    field = f"tasks[{t_index}].egress[{r_index}].credential.file"
                    value = credential_value(
                        reader.read(rule.credential.file, field), rule.credential.prefix, file=name, field=field
                    )
                    creds[r_index] = Credential(rule.credential.header, value)
            sources.append(TaskSource(task, creds))

        now = self.clock()
        for token in self._posted.values():
            reader.digest.update(token.encode() + b"\0")
        reader.digest.update(",".join(sorted(self._own_revoked)).encode())
        grant_set = load_grants(
            settings.grants,
            reader.read,
            lambda path: loaded.resolve(path).exists(),
            file=name,
            svids=identity_ctx.x509 if identity_ctx is not None else None,
            agent=agent,
            credentials=named,
            posted=self._posted,
            own_revocations=self._own_revocation_list(agent),
            now=now,
        )
        for path in settings.grants.revocations:
            reader.watch(path)  # a list published later must trigger a reload
        file_grants, file_tasks = self._task_files(loaded, reader, grant_set, agent, named, now)
        for grant, revoked_here in [(g, False) for g in grant_set.grants] + file_grants:
            creds = {i: named[r.credential] for i, r in enumerate(grant.spec.egress) if isinstance(r.credential, str)}
            revoked = revoked_here or revoked_by(grant, grant_set.revocations) is not None
            sources.append(TaskSource(grant.spec, creds, grant, revoked))
        sources.extend(file_tasks)
        if len(sources) > len(settings.tasks):  # grants and task files: check them with the config's tasks
            _check_tls_rules(sources, settings.intercept is not None, name)
        seen: set[str] = set()
        for source in sources:
            if source.spec.id in seen:
                raise ConfigError(name, "tasks", f"task id {source.spec.id!r} is declared twice (config and grants)")
            seen.add(source.spec.id)

        first_seen = dict(self._first_seen)
        policy = compile_policy(sources, lambda task_id: first_seen.setdefault(task_id, now), agent)

        retired = tuple((key, until) for key, until in self._retired if until > now)
        if previous is not None and previous.keys.current.kid != current.kid:
            retired += ((previous.keys.current, now + previous.loaded.settings.issuer.max_token_ttl),)
        keys = KeySet(current=current, next=next_key, retired=retired)
        minter = TokenMinter(
            current,
            issuer.url,
            issuer.max_token_ttl,
            issuer.refresh_ahead,
            issuer.mint_per_call,
            self.tokens,
            self._defer,
            self.clock,
        )
        # The compiled policy replaces the task declarations: keep the settings without them
        # (10,000 rules as pydantic models are ~14 MB; nothing reads them after compiling).
        slim = replace(loaded, settings=settings.model_copy(update={"tasks": []}))
        snapshot = Snapshot(
            slim,
            policy,
            ingress,
            identity_ctx,
            grant_set,
            keys,
            minter,
            reader.digest.hexdigest(),
            frozenset(reader.watched),
        )
        # Commit state only once the whole snapshot is built.
        self._first_seen = {tid: first_seen[tid] for tid in policy.tasks_by_id}
        self._retired = retired
        self.budgets.retain(policy.tasks_by_id)
        self.tokens.retain({(t.id, t.fingerprint) for t in policy.tasks_by_id.values()})
        return snapshot

    def _task_files(
        self,
        loaded: LoadedConfig,
        reader: _Reader,
        grant_set: GrantSet,
        agent: str,
        named: dict[str, Credential],
        now: float,
    ) -> tuple[list[tuple[Grant, bool]], list[TaskSource]]:
        """Tasks from ``task_files`` (downward-API annotation files): grants, or plain task documents."""
        name = str(loaded.source)
        grants: list[tuple[Grant, bool]] = []
        tasks: list[TaskSource] = []
        for index, spec in enumerate(loaded.settings.task_files):
            field = f"task_files[{index}]"
            reader.watch(spec.path)
            revoked = False
            if spec.revoked is not None:
                reader.watch(spec.revoked)
                if loaded.resolve(spec.revoked).exists():
                    revoked = reader.read_optional(spec.revoked, f"{field}.revoked").strip().lower() == b"true"
            if not loaded.resolve(spec.path).exists():
                continue
            text = reader.read_optional(spec.path, f"{field}.path").decode("utf-8", "replace").strip()
            if not text:
                continue
            if looks_like_jws(text):
                try:
                    grant = grant_set.verifier.verify(text, now=now)
                    check_grant_usable(grant, agent, named)
                except GrantError as exc:
                    raise ConfigError(name, f"{field}.path", str(exc)) from None
                grants.append((grant, revoked))
                continue
            task = parse_task_document(text, agent, file=name, field=f"{field}.path", revoked=revoked)
            check_task_credentials(task, named, file=name, field=f"{field}.path")
            creds = {i: named[r.credential] for i, r in enumerate(task.egress) if isinstance(r.credential, str)}
            tasks.append(TaskSource(task, creds))
        return grants, tasks

    def _load_identity(self, loaded: LoadedConfig, reader: _Reader) -> IdentityState | None:
        spec = loaded.settings.identity
        if spec is None:
            return None
        if spec.source == "workload_api":
            if self._workload_identity is None:
                raise ConfigError(str(loaded.source), "identity", "no identity from the Workload API yet")
            return self._workload_identity
        assert spec.files is not None
        return load_identity_files(spec.files, reader.read, file=str(loaded.source))

    @staticmethod
    def _agent(loaded: LoadedConfig, identity: IdentityState | None) -> str:
        configured = loaded.settings.agent
        if identity is None:
            assert configured is not None  # the schema requires agent or identity
            return configured
        if configured is not None and configured != identity.svid.spiffe_id:
            raise ConfigError(
                str(loaded.source),
                "agent",
                f"{configured} does not match the SVID's SPIFFE ID {identity.svid.spiffe_id}",
            )
        return identity.svid.spiffe_id

    def set_identity(self, state: IdentityState) -> bool:
        """Swap in a new identity from the Workload API (rotation without restart).

        Returns:
            ``False`` (and logs ``identity_rejected``) when the SVID names another SPIFFE ID than the
            one the policy was compiled for; the previous identity then stays active.
        """
        snapshot = self.snapshot
        if state.svid.spiffe_id != snapshot.policy.agent:
            self.last_identity_error = f"SVID for {state.svid.spiffe_id}, expected {snapshot.policy.agent}"
            _log.error("identity_rejected", reason=self.last_identity_error)
            return False
        self._workload_identity = state
        self.last_identity_error = None
        self.snapshot = replace(snapshot, identity=IdentityContext.build(state, snapshot.ingress.audiences))
        return True

    def _files_digest(self, snapshot: Snapshot) -> str:
        """SHA-256 over the bytes of every file ``snapshot`` read (and the posted grants and own
        revocations): equal digests mean a rebuild would change nothing, so parsing is skipped."""
        digest = hashlib.sha256()
        for path in sorted(snapshot.watched):
            digest.update(str(path).encode() + b"\0")
            try:
                digest.update(path.read_bytes())
            except OSError as exc:
                digest.update(f"unreadable: {exc.errno}".encode())
        for token in self._posted.values():
            digest.update(token.encode())
        digest.update(repr(sorted(self._own_revoked.items())).encode())
        return digest.hexdigest()

    def reload(self) -> bool:
        """Re-read the configuration and swap it in if it is valid and changed.

        Returns:
            ``True`` when a new snapshot is active. On error the previous snapshot stays active,
            ``last_error`` holds the message and a ``config_reload_failed`` event is logged.
        """
        previous = self.snapshot
        files_digest = self._files_digest(previous)
        if files_digest == self._last_files_digest:
            return False
        try:
            snapshot = self._build(previous)
        except ConfigError as exc:
            self.reload_failures += 1
            self.last_error = str(exc)
            _log.error("config_reload_failed", file=exc.file, field=exc.field, reason=exc.reason, code=exc.code)
            return False
        self._last_files_digest = files_digest
        if snapshot.digest == previous.digest:
            return False
        if snapshot.loaded.settings.decision_log != previous.loaded.settings.decision_log:
            _log.warning("decision_log_change_needs_restart", file=str(self.config_path))
        if snapshot.loaded.settings.intercept != previous.loaded.settings.intercept:
            _log.warning("intercept_change_needs_restart", file=str(self.config_path))
        if snapshot.loaded.settings.viewer != previous.loaded.settings.viewer:
            _log.warning("viewer_change_needs_restart", file=str(self.config_path))
        self.snapshot = snapshot
        self.reloads += 1
        self.last_error = None
        for listener in self._listeners:
            listener(snapshot)
        _log.info(
            "config_reloaded",
            file=str(self.config_path),
            digest=snapshot.digest[:16],
            tasks=len(snapshot.policy.tasks_by_id),
        )
        return True

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener(snapshot)`` after each new snapshot is swapped in (on the reloading thread)."""
        self._listeners.append(listener)

    def decide(self, request: AuthzRequest, decision_id: str) -> Decision:
        """Decide ``request`` against the active snapshot (read once, so a swap mid-call is harmless).

        With ``dry_run: true`` the policy's decision is turned into an allow by
        :func:`~sidecar.policy.engine.dry_run`.
        """
        snapshot = self.snapshot
        if request.protocol is not Protocol.HTTP:
            decision = decide_connection(
                snapshot.policy, request, now=self.clock(), decision_id=decision_id, budgets=self.budgets
            )
        elif request.direction is Direction.EGRESS:
            identity = snapshot.identity
            bind = identity is not None and snapshot.loaded.settings.issuer.bind_to_svid
            decision = decide_egress(
                snapshot.policy,
                request,
                now=self.clock(),
                decision_id=decision_id,
                budgets=self.budgets,
                minter=snapshot.minter,
                cnf=identity.state.svid.x5t_s256 if bind and identity is not None else None,
            )
        else:
            decision = decide_ingress(
                snapshot.ingress,
                request,
                identity=snapshot.identity,
                agent=snapshot.policy.agent,
                now=self.clock(),
                decision_id=decision_id,
            )
        return dry_run(decision) if snapshot.loaded.settings.dry_run else decision

    # -- grants: accept, delegate, revoke ------------------------------------------------------------
    def add_grant(self, token: str) -> Grant:
        """Accept a grant posted by the local agent (``POST /v1/tasks``) and enforce it at once.

        Raises:
            GrantError: it does not verify, is expired, names another agent or a credential this
                sidecar lacks, or reuses a task id.
        """
        snapshot = self.snapshot
        now = self.clock()
        grant = snapshot.grants.verifier.verify(token.strip(), now=now)
        check_grant_usable(grant, snapshot.policy.agent, snapshot.loaded.settings.credentials)
        if now >= grant.expires_at:
            raise GrantError("grant_expired", "the grant has expired")
        if grant.id in snapshot.policy.tasks_by_id:
            raise GrantError("grant_duplicate", f"task {grant.id!r} is already active")
        self._posted[grant.id] = grant.token
        if not self.reload():
            del self._posted[grant.id]
            raise GrantError("grant_rejected", self.last_error or "the configuration did not reload")
        return grant

    def delegate(self, task_id: str, request: DelegationRequest) -> tuple[str, TaskSpec]:
        """Issue a sub-grant of ``task_id`` signed with this agent's SVID (``POST /v1/tasks/{id}/delegate``).

        Raises:
            GrantError: unknown task, no identity to sign with, or a widening (see
                :func:`sidecar.grants.issue.delegate`).
        """
        snapshot = self.snapshot
        task = snapshot.policy.tasks_by_id.get(task_id)
        if task is None or task.agent != snapshot.policy.agent:
            raise GrantError("grant_unknown_task", f"no task {task_id!r} for this agent")
        if snapshot.identity is None:
            raise GrantError(
                "grant_not_delegable", "delegation signs with the agent's X.509-SVID: configure an identity source"
            )
        token, child = delegate(
            task,
            request,
            svid=snapshot.identity.state.svid,
            budgets=self.budgets,
            now=self.clock(),
            max_depth=snapshot.loaded.settings.grants.max_depth,
        )
        assert task.grant is not None  # delegate() refuses tasks without a grant
        self._issued[child.id] = Delegation(
            child, task.id, task.grant.txn, (*task.grant.ancestors, task.grant.id), self.clock()
        )
        _log.info(
            "task_delegated", task_id=task_id, child=child.id, subject=child.agent, expires_at=str(child.expires_at)
        )
        return token, child

    def revoke(self, task_id: str) -> str | None:
        """Revoke a task this agent holds or delegated (``POST /v1/tasks/{id}/revoke``).

        The id joins this sidecar's own revocation list, which applies here at once and is signed with
        the agent's SVID and written to ``grants.publish_revocations`` for other sidecars to watch.

        Returns:
            The compact JWS of the published list, or ``None`` without an identity to sign it.

        Raises:
            GrantError: ``grant_unknown_task`` for an id this sidecar has never seen.
        """
        snapshot = self.snapshot
        known = set(snapshot.policy.tasks_by_id) | set(self._issued)
        if task_id not in known:
            raise GrantError("grant_unknown_task", f"no task {task_id!r} held or delegated here")
        self._own_revoked[task_id] = int(self.clock())
        token = self._publish_revocations(snapshot)
        self.reload()
        _log.info("task_revoked", task_id=task_id, published=token is not None)
        return token

    def delegations(self) -> tuple[Delegation, ...]:
        """The sub-grants this sidecar issued, oldest first (kept for the life of the process)."""
        return tuple(self._issued.values())

    def revoked_here(self) -> frozenset[str]:
        """Task ids this sidecar revoked itself (its own revocation list)."""
        return frozenset(self._own_revoked)

    def revocation_list(self) -> str | None:
        """This sidecar's own signed revocation list (``GET /v1/revocations``), or ``None``."""
        return self._published

    def _publish_revocations(self, snapshot: Snapshot) -> str | None:
        identity = snapshot.identity
        if identity is None:
            return None
        svid = identity.state.svid
        token = sign_revocations(
            self._own_revoked,
            svid.private_key,
            issuer=svid.spiffe_id,
            issued_at=max(self._own_revoked.values()),
            x5c=list(svid.chain),
        )
        self._published = token
        target = snapshot.loaded.settings.grants.publish_revocations
        if target is not None:
            path = snapshot.loaded.resolve(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(token + "\n")
            tmp.replace(path)  # atomic: watchers never read half a list
        return token

    def _own_revocation_list(self, agent: str) -> RevocationList | None:
        if not self._own_revoked:
            return None
        return RevocationList(agent, frozenset(self._own_revoked), max(self._own_revoked.values()), False, "")

    def jwks(self) -> dict[str, Any]:
        """The JWKS document of the active keys (RFC 7517 §5)."""
        return self.snapshot.keys.jwks(self.clock())
