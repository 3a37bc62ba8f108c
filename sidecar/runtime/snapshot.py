"""Assemble one :class:`Snapshot` from a loaded configuration and the :class:`CarriedState`.

:func:`build_snapshot` is pure assembly: everything it depends on is an argument - the validated
configuration, the state carried over from earlier snapshots (first-seen times, posted grants,
own revocations, retired keys, the Workload API identity) and a :class:`FileSource` for the files
the configuration names. It returns the new snapshot with the carried state to keep, and never
changes anything else, so a failed build leaves nothing behind. Unit tests build snapshots in
memory (:class:`~sidecar.runtime.inputs.MemoryFiles`).

Every file read is fingerprinted (:class:`~sidecar.runtime.inputs.InputRecorder`), so the runtime can
tell without parsing anything whether a rebuild would read the same bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sidecar.config.loader import LoadedConfig, read_secret_file
from sidecar.config.schema import tls_rule_conflicts
from sidecar.config.task_file import check_task_credentials, looks_like_jws, parse_task_document
from sidecar.control.documents import Action, ControlError, verify_action
from sidecar.credentials import credential_value
from sidecar.errors import ConfigError
from sidecar.grants.model import Grant, GrantError
from sidecar.grants.revocations import RevocationList, revoked_by
from sidecar.grants.sources import GrantSet, check_grant_usable, load_grants
from sidecar.identity.state import IdentityState, load_identity_files
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.ingress import IdentityContext, IngressPolicy, compile_ingress
from sidecar.policy.model import Credential, EgressRule, PolicyIndex
from sidecar.policy.names import NameList
from sidecar.runtime.inputs import DISK, InputRecorder, Inputs
from sidecar.state.store import DelegatedChild, Remembered
from sidecar.tokens.keys import KeySet, RetiredKey, SigningKey, load_signing_key
from sidecar.tokens.minter import TokenCache, TokenMinter

__all__ = ["CarriedState", "KeyRecord", "RefusedAction", "Snapshot", "build_snapshot"]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# -- carried state -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyRecord:
    """The signing key of the last active snapshot, as plain data: retired (published, no longer
    signing) for ``max_token_ttl`` once the configuration names another key."""

    kid: str
    public_jwk: Mapping[str, Any] = field(compare=False)
    max_token_ttl: float


@dataclass(frozen=True, slots=True)
class CarriedState:
    """What outlives one snapshot and goes into the next; all of it but the keys and the identity is
    also kept in the durable state (:class:`~sidecar.state.StateStore`), so a restart carries it too.

    Attributes:
        first_seen: task id -> POSIX seconds of its first load (the anchor of ``ttl`` tasks, so a
            reload or a restart never extends one).
        ends: task id -> end of its validity as last compiled (POSIX seconds). A task that is no
            longer compiled (removed, or a grant that fails verification for a while) keeps its
            anchor - and the runtime its call counters - until then, so its coming back neither
            extends nor refills it.
        posted: task id -> compact JWS of a grant accepted through ``POST /v1/tasks``.
        own_revoked: task id -> POSIX seconds it was revoked here (``POST /v1/tasks/{id}/revoke``).
        received: source -> the revocation lists received from it, merged per signer (what a list
            once revoked stays revoked when the file shrinks or goes); ``authority`` is the cluster
            authority's feed, whose latest snapshot replaces what it said before (one list per signer).
        issued: child task id -> the delegation this sidecar made (it may revoke the child); dropped
            once the child has expired.
        retired: earlier signing keys still published (until their tokens have expired).
        signing_key: the key of the last snapshot built (retired when the next build names another).
        identity: the latest X.509-SVID and bundles from the Workload API (``identity.source:
            workload_api``; ``None`` otherwise or before the first one arrived).
    """

    first_seen: Mapping[str, float] = field(default_factory=dict)
    ends: Mapping[str, float] = field(default_factory=dict)
    posted: Mapping[str, str] = field(default_factory=dict)
    own_revoked: Mapping[str, int] = field(default_factory=dict)
    received: Mapping[str, tuple[RevocationList, ...]] = field(default_factory=dict)
    issued: Mapping[str, DelegatedChild] = field(default_factory=dict)
    retired: tuple[RetiredKey, ...] = ()
    signing_key: KeyRecord | None = None
    identity: IdentityState | None = None

    def __post_init__(self) -> None:
        for name in ("first_seen", "ends", "posted", "own_revoked", "received", "issued"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def rebuild_key(self) -> tuple[object, ...]:
        """The part of the state a build reads besides files: two states with equal keys build equal
        snapshots from equal files."""
        received = tuple(
            (source, tuple(sorted((r.signer, r.root, tuple(sorted(r.ids))) for r in lists)))
            for source, lists in sorted(self.received.items())
        )
        return tuple(sorted(self.posted.items())), tuple(sorted(self.own_revoked.items())), received

    def remembered(self) -> Remembered:
        """The part kept in the durable state."""
        anchors = {tid: (at, self.ends.get(tid, float("inf"))) for tid, at in self.first_seen.items()}
        return Remembered(anchors, self.posted, self.own_revoked, self.received, self.issued)

    @classmethod
    def from_remembered(cls, remembered: Remembered) -> CarriedState:
        """The carried state a restarted sidecar starts from."""
        return cls(
            first_seen={tid: at for tid, (at, _) in remembered.anchors.items()},
            ends={tid: end for tid, (_, end) in remembered.anchors.items()},
            posted=remembered.posted,
            own_revoked=remembered.own_revoked,
            received=remembered.received,
            issued=remembered.delegated,
        )


# -- the snapshot ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RefusedAction:
    """A line of a ``ladder.files`` file that does not verify: where, its fingerprint, why."""

    source: str
    fingerprint: str
    error: ControlError


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
        digest: SHA-256 over the config file, every file it references, the posted grants and the
            own revocations (shown in ``/readyz``).
        inputs: every file the build read or checked, with its fingerprint.
        carried: the state to carry into the next build.
        actions: the signed ladder actions read from ``ladder.files`` (verified; the runtime's
            :class:`~sidecar.control.ladder.Ladder` keeps them from then on).
        refused_actions: the lines of those files that did not verify.
        dns_names: ``dns.allow``, compiled (the names that resolve besides the tasks' hosts).
        pins: host -> the IP address of its ``envoy.destinations`` entry (those given as IP literals):
            addresses of the name for the ``tls: passthrough`` binding.
    """

    loaded: LoadedConfig
    policy: PolicyIndex
    ingress: IngressPolicy
    identity: IdentityContext | None
    grants: GrantSet
    keys: KeySet
    minter: TokenMinter
    digest: str
    inputs: Inputs
    carried: CarriedState
    actions: tuple[Action, ...] = ()
    refused_actions: tuple[RefusedAction, ...] = ()
    dns_names: NameList = field(default_factory=NameList)
    pins: Mapping[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = field(default_factory=dict)

    @property
    def watched(self) -> frozenset[Path]:
        """The files whose change may change the snapshot."""
        return frozenset(self.inputs)


class _Reader:
    """Reads the files one configuration names: resolved, size-checked, hashed into the digest."""

    def __init__(self, loaded: LoadedConfig, recorder: InputRecorder) -> None:
        self.loaded = loaded
        self.recorder = recorder
        self.digest = hashlib.sha256(loaded.digest.encode())
        recorder.note(loaded.source, "sha256:" + loaded.digest)

    def watch(self, path: Path) -> None:
        self.recorder.note(self.loaded.resolve(path))

    def exists(self, path: Path) -> bool:
        return self.recorder.exists(self.loaded.resolve(path))

    def read(self, path: Path, field: str) -> bytes:
        resolved = self.loaded.resolve(path)
        data = read_secret_file(resolved, file=str(self.loaded.source), field=field, fetch=self.recorder.fetch)
        self.digest.update(field.encode() + b"\0" + data + b"\0")
        return data

    def read_optional(self, path: Path, field: str, limit: int = 1024 * 1024) -> bytes:
        """Like :meth:`read`, but an empty file is fine (an unset annotation mounts as an empty file)."""
        resolved = self.loaded.resolve(path)
        try:
            data = self.recorder.fetch(resolved, limit)
        except OSError as exc:
            raise ConfigError(str(self.loaded.source), field, f"cannot read {resolved}: {exc.strerror}") from None
        if len(data) > limit:
            raise ConfigError(str(self.loaded.source), field, f"{resolved} is larger than {limit} bytes")
        self.digest.update(field.encode() + b"\0" + data + b"\0")
        return data


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


_WIDEST_HOST = 253  # RFC 1035 §2.3.4, as text


def _widest_audience(rule: EgressRule) -> str:
    """The longest default audience a rule's token can carry: any port, and for a ``*.suffix`` rule the
    longest host name it matches."""
    host = rule.host if not rule.host.startswith("*.") else "x" * _WIDEST_HOST
    return f"https://{host}:65535"


def _check_token_sizes(
    sources: list[TaskSource], policy: PolicyIndex, minter: TokenMinter, loaded: LoadedConfig
) -> None:
    """Every token rule's longest token fits ``issuer.max_token_size``.

    Raises:
        ConfigError: naming the rule's largest claim (``scope``, ``audience``, the task's
            ``on_behalf_of``, or a grant's ``act`` chain) - ``tasks[i].egress[j].scope`` for a task of
            ``sidecar.yaml``, the task id for a grant or task file.
    """
    settings = loaded.settings
    cap, cnf, configured = int(settings.issuer.max_token_size), settings.issuer.bind_to_svid, len(settings.tasks)
    for index, source in enumerate(sources):
        task = policy.tasks_by_id[source.spec.id]
        for r_index, rule in enumerate(task.rules):
            if not rule.token:
                continue
            audience = rule.audience or _widest_audience(rule)
            size = minter.size_bound(
                subject=task.token_subject,
                actor=task.token_actor,
                client_id=policy.agent,
                audience=audience,
                scope=rule.scope,
                txn=task.txn,
                cnf=cnf,
            )
            if size <= cap:
                continue
            parts = {
                f"egress[{r_index}].scope": len(rule.scope or ""),
                f"egress[{r_index}].{'audience' if rule.audience else 'host'}": len(audience),
                "on_behalf_of": len(task.on_behalf_of or ""),
                "the grant's act chain": len(str(task.token_actor)),
            }
            largest = max(parts, key=lambda name: parts[name])
            reason = (
                f"a token of this rule can be {size} bytes, over issuer.max_token_size ({cap}); its largest claim is "
                f"{largest} ({parts[largest]} characters)"
            )
            if index < configured and not largest.startswith("the grant"):
                raise ConfigError(str(loaded.source), f"tasks[{index}].{largest}", reason)
            raise ConfigError(str(loaded.source), "tasks", f"task {task.id!r} {largest}: {reason}")


def _identity(loaded: LoadedConfig, reader: _Reader, carried: CarriedState, now: float) -> IdentityState | None:
    spec = loaded.settings.identity
    if spec is None:
        return None
    if spec.source == "workload_api":
        if carried.identity is None:
            raise ConfigError(str(loaded.source), "identity", "no identity from the Workload API yet")
        return carried.identity
    files = spec.files
    assert files is not None
    return load_identity_files(
        reader.read,
        svid=files.svid,
        key=files.key,
        bundles=files.bundles,
        jwt_bundles=files.jwt_bundles,
        file=str(loaded.source),
        now=now,
    )


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


def _own_revocation_list(carried: CarriedState, agent: str) -> RevocationList | None:
    if not carried.own_revoked:
        return None
    revoked = carried.own_revoked
    return RevocationList(agent, frozenset(revoked), max(revoked.values()), False, "")


def _task_files(
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
        field_name = f"task_files[{index}]"
        reader.watch(spec.path)
        revoked = False
        if spec.revoked is not None:
            reader.watch(spec.revoked)
            if reader.exists(spec.revoked):
                revoked = reader.read_optional(spec.revoked, f"{field_name}.revoked").strip().lower() == b"true"
        if not reader.exists(spec.path):
            continue
        text = reader.read_optional(spec.path, f"{field_name}.path").decode("utf-8", "replace").strip()
        if not text:
            continue
        if looks_like_jws(text):
            try:
                grant = grant_set.verifier.verify(text, now=now)
                check_grant_usable(grant, agent, named)
            except GrantError as exc:
                raise ConfigError(name, f"{field_name}.path", str(exc)) from None
            grants.append((grant, revoked))
            continue
        task = parse_task_document(text, agent, file=name, field=f"{field_name}.path", revoked=revoked)
        check_task_credentials(task, named, file=name, field=f"{field_name}.path")
        creds = {i: named[r.credential] for i, r in enumerate(task.egress) if isinstance(r.credential, str)}
        tasks.append(TaskSource(task, creds))
    return grants, tasks


def _sources(
    loaded: LoadedConfig,
    reader: _Reader,
    carried: CarriedState,
    agent: str,
    identity: IdentityContext | None,
    now: float,
) -> tuple[list[TaskSource], GrantSet, dict[str, Credential]]:
    """Every task to compile (config, grants, posted grants, task files), the grants and the credentials."""
    settings, name = loaded.settings, str(loaded.source)
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
                field_name = f"tasks[{t_index}].egress[{r_index}].credential.file"
                value = credential_value(
                    reader.read(rule.credential.file, field_name), rule.credential.prefix, file=name, field=field_name
                )
                creds[r_index] = Credential(rule.credential.header, value)
        sources.append(TaskSource(task, creds))

    for token in carried.posted.values():
        reader.digest.update(token.encode() + b"\0")
    reader.digest.update(",".join(sorted(carried.own_revoked)).encode())
    grant_set = load_grants(
        settings.grants,
        reader.read,
        reader.exists,
        file=name,
        svids=identity.x509 if identity is not None else None,
        agent=agent,
        credentials=named,
        posted=carried.posted,
        own_revocations=_own_revocation_list(carried, agent),
        now=now,
        received=carried.received,
    )
    for _, lists in sorted(carried.received.items()):  # the feed's lists are no file: digest them
        for revocations in lists:
            reader.digest.update(f"{revocations.signer}\0{revocations.root}\0".encode())
            reader.digest.update(",".join(sorted(revocations.ids)).encode() + b"\0")
    for path in settings.grants.revocations:
        reader.watch(path)  # a list published later must trigger a reload
    file_grants, file_tasks = _task_files(loaded, reader, grant_set, agent, named, now)
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
    return sources, grant_set, named


def _keys(loaded: LoadedConfig, reader: _Reader, carried: CarriedState, now: float) -> KeySet:
    issuer, name = loaded.settings.issuer, str(loaded.source)
    current = load_signing_key(
        reader.read(issuer.signing_key, "issuer.signing_key"), issuer.algorithm, file=name, field="issuer.signing_key"
    )
    next_key: SigningKey | None = None
    if issuer.next_signing_key is not None:
        pem = reader.read(issuer.next_signing_key, "issuer.next_signing_key")
        next_key = load_signing_key(pem, issuer.algorithm, file=name, field="issuer.next_signing_key")
    retired = tuple(key for key in carried.retired if key.until > now)
    last = carried.signing_key
    if last is not None and last.kid != current.kid:
        retired += (RetiredKey(last.kid, dict(last.public_jwk), now + last.max_token_ttl),)
    return KeySet(current=current, next=next_key, retired=retired)


def _ladder_actions(
    loaded: LoadedConfig, reader: _Reader, grant_set: GrantSet, now: float
) -> tuple[tuple[Action, ...], tuple[RefusedAction, ...]]:
    """The signed actions of ``ladder.files`` (one compact JWS per line; a missing file is empty), and
    the lines that do not verify (skipped: an action once honoured is kept by the runtime's ladder,
    so a line whose signer's SVID has since expired loses nothing; a bad new line is reported).
    """
    actions: list[Action] = []
    refused: list[RefusedAction] = []
    for index, path in enumerate(loaded.settings.ladder.files):
        field_name = f"ladder.files[{index}]"
        reader.watch(path)
        if not reader.exists(path):
            continue
        text = reader.read_optional(path, field_name, limit=16 * 1024 * 1024).decode("ascii", "replace")
        source = f"file:{path}"
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                actions.append(verify_action(line, verifier=grant_set.verifier, now=now, source=source))
            except ControlError as exc:
                refused.append(RefusedAction(source, hashlib.sha256(line.strip().encode()).hexdigest()[:16], exc))
    return tuple(actions), tuple(refused)


def build_snapshot(
    loaded: LoadedConfig,
    carried: CarriedState,
    *,
    now: float | None = None,
    recorder: InputRecorder | None = None,
    tokens: TokenCache | None = None,
    clock: Callable[[], float] = time.time,
    defer: Callable[[Callable[[], None]], Any] | None = None,
) -> Snapshot:
    """Compile ``loaded`` with ``carried`` into a snapshot.

    Args:
        loaded: the validated configuration (its tasks are compiled, then dropped from the copy kept).
        carried: the state carried over (see :class:`CarriedState`).
        now: POSIX seconds (grant validity, ``ttl`` anchors of new tasks); ``clock()`` when omitted.
        recorder: reads the files the configuration names and notes what it read (pass one to see
            the inputs of a build that failed); reads the disk when omitted.
        tokens: the token cache the minter fills (shared across snapshots); a new one when omitted.
        clock: POSIX seconds, for the minter.
        defer: schedules the minter's background refreshes; ``None`` refreshes inline.

    Returns:
        The snapshot; ``snapshot.carried`` is the state to carry into the next build (first-seen
        times of exactly the compiled tasks, unexpired retired keys, this build's signing key).

    Raises:
        ConfigError: a file is unreadable or invalid, a grant does not verify, task ids collide, TLS
            rules of different sources conflict, a rule's token could exceed ``issuer.max_token_size``,
            or the Workload API has given no identity yet;
            :class:`~sidecar.identity.state.IdentityLoadError` (a ``ConfigError``) when an
            ``identity.files`` file is unusable or the SVID fails the local identity checks.
    """
    now = clock() if now is None else now
    reader = _Reader(loaded, recorder if recorder is not None else InputRecorder(DISK))
    settings = loaded.settings
    keys = _keys(loaded, reader, carried, now)
    identity = _identity(loaded, reader, carried, now)
    agent = _agent(loaded, identity)
    ingress = compile_ingress(settings, agent)
    identity_ctx = IdentityContext.build(identity, ingress) if identity is not None else None
    sources, grant_set, _ = _sources(loaded, reader, carried, agent, identity_ctx, now)
    actions, refused_actions = _ladder_actions(loaded, reader, grant_set, now)

    first_seen = dict(carried.first_seen)
    policy = compile_policy(sources, lambda task_id: first_seen.setdefault(task_id, now), agent, settings.sensitivity)
    compiled = policy.tasks_by_id
    ends = {task_id: task.expires_at for task_id, task in compiled.items()}
    for task_id, end in carried.ends.items():  # absent now: remembered until it would have ended
        if task_id not in compiled and end > now and task_id in first_seen:
            ends[task_id] = end
    issuer = settings.issuer
    minter = TokenMinter(
        keys.current,
        issuer.url,
        issuer.max_token_ttl,
        issuer.refresh_ahead,
        issuer.mint_per_call,
        tokens if tokens is not None else TokenCache(),
        defer,
        clock,
    )
    _check_token_sizes(sources, policy, minter, loaded)
    next_carried = replace(
        carried,
        first_seen={task_id: first_seen[task_id] for task_id in ends},
        ends=ends,
        received=grant_set.received,
        issued={child: record for child, record in carried.issued.items() if record.expires_at > now},
        retired=keys.retired,
        signing_key=KeyRecord(keys.current.kid, dict(keys.current.public_jwk), issuer.max_token_ttl),
    )
    # The compiled policy replaces the task declarations: keep the settings without them
    # (10,000 rules as pydantic models are ~14 MB; nothing reads them after compiling).
    slim = replace(loaded, settings=settings.model_copy(update={"tasks": []}))
    return Snapshot(
        slim,
        policy,
        ingress,
        identity_ctx,
        grant_set,
        keys,
        minter,
        reader.digest.hexdigest(),
        reader.recorder.inputs(),
        next_carried,
        actions,
        refused_actions,
        NameList.compile(settings.dns.allow if settings.dns is not None else ()),
        _pins(settings.envoy.destinations),
    )


def _pins(destinations: Mapping[str, str]) -> Mapping[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The ``envoy.destinations`` entries given as ``ip:port`` (a name there is resolved by Envoy, not pinned)."""
    pins = {}
    for host, address in destinations.items():
        try:
            pins[host] = frozenset({ipaddress.ip_address(address.rpartition(":")[0].strip("[]"))})
        except ValueError:
            continue
    return MappingProxyType(pins)
