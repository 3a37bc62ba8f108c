"""The active configuration: compiled once, swapped atomically, reloaded without restart.

A :class:`Snapshot` holds everything a decision reads (policy index, keys, minter). A reload builds
a complete new snapshot first and swaps it in with one assignment; if anything fails (YAML, schema,
unreadable key or credential file) the previous snapshot stays active and the error is logged.
Call budgets, token cache and ``ttl`` anchors live in the :class:`Runtime` and survive reloads.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from sidecar.config.loader import LoadedConfig, load_config, read_secret_file
from sidecar.decision import AuthzRequest, Decision, Direction, Protocol
from sidecar.errors import ConfigError, KeyLoadError
from sidecar.identity.state import IdentityState, load_identity_files
from sidecar.policy.budget import BudgetLedger
from sidecar.policy.compile import compile_policy
from sidecar.policy.connection import decide_connection
from sidecar.policy.engine import decide_egress
from sidecar.policy.ingress import IdentityContext, IngressPolicy, compile_ingress, decide_ingress
from sidecar.policy.model import PolicyIndex
from sidecar.tokens.keys import KeySet, SigningKey, load_signing_key
from sidecar.tokens.minter import TokenCache, TokenMinter

__all__ = ["Runtime", "Snapshot"]

_log = structlog.get_logger("agent_authz.runtime")
_HEADER_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent, compiled configuration.

    Attributes:
        loaded: the validated file.
        policy: compiled tasks (``policy.agent`` is this agent's SPIFFE ID).
        ingress: compiled ingress rules.
        identity: this agent's SVID, the trust bundles and verifiers; ``None`` without an identity source.
        keys: signing and published keys.
        minter: token minter bound to ``keys.current``.
        digest: SHA-256 over the config file and every file it references.
        watched: files whose change triggers a reload.
    """

    loaded: LoadedConfig
    policy: PolicyIndex
    ingress: IngressPolicy
    identity: IdentityContext | None
    keys: KeySet
    minter: TokenMinter
    digest: str
    watched: frozenset[Path]


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
        self.clock = clock
        self.budgets = BudgetLedger()
        self.tokens = TokenCache()
        self._defer = defer
        self._first_seen: dict[str, float] = {}
        self._retired: tuple[tuple[SigningKey, float], ...] = ()
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self.snapshot: Snapshot = self._build(None)

    def _read(self, loaded: LoadedConfig, path: Path, field: str, digest: Any) -> bytes:
        data = read_secret_file(loaded.resolve(path), file=str(loaded.source), field=field)
        digest.update(field.encode() + b"\0" + data + b"\0")
        return data

    def _build(self, previous: Snapshot | None) -> Snapshot:
        loaded = load_config(self.config_path)
        settings = loaded.settings
        issuer = settings.issuer
        digest = hashlib.sha256(loaded.digest.encode())
        watched = {loaded.source}
        name = str(loaded.source)

        pem = self._read(loaded, issuer.signing_key, "issuer.signing_key", digest)
        current = load_signing_key(pem, issuer.algorithm, file=name, field="issuer.signing_key")
        watched.add(loaded.resolve(issuer.signing_key))
        next_key = None
        if issuer.next_signing_key is not None:
            pem = self._read(loaded, issuer.next_signing_key, "issuer.next_signing_key", digest)
            next_key = load_signing_key(pem, issuer.algorithm, file=name, field="issuer.next_signing_key")
            watched.add(loaded.resolve(issuer.next_signing_key))

        identity = self._load_identity(loaded, digest, watched)
        agent = self._agent(loaded, identity)

        credentials: dict[tuple[int, int], str] = {}
        for t_index, task in enumerate(settings.tasks):
            for r_index, rule in enumerate(task.egress):
                if rule.credential is None:
                    continue
                field = f"tasks[{t_index}].egress[{r_index}].credential.file"
                raw = self._read(loaded, rule.credential.file, field, digest)
                try:
                    value = rule.credential.prefix + raw.decode("ascii").strip()
                except UnicodeDecodeError:
                    raise KeyLoadError(name, field, "credential must be printable ASCII") from None
                if not _HEADER_VALUE.match(value):
                    raise KeyLoadError(name, field, "credential must be one line of printable ASCII")
                credentials[(t_index, r_index)] = value
                watched.add(loaded.resolve(rule.credential.file))

        now = self.clock()
        first_seen = dict(self._first_seen)
        policy = compile_policy(settings, credentials, lambda task_id: first_seen.setdefault(task_id, now), agent)
        ingress = compile_ingress(settings, agent)
        identity_ctx = IdentityContext.build(identity, ingress.audiences) if identity is not None else None

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
        snapshot = Snapshot(loaded, policy, ingress, identity_ctx, keys, minter, digest.hexdigest(), frozenset(watched))
        # Commit state only once the whole snapshot is built.
        self._first_seen = {tid: first_seen[tid] for tid in policy.tasks_by_id}
        self._retired = retired
        self.budgets.retain(policy.tasks_by_id)
        self.tokens.retain({(t.id, t.fingerprint) for t in policy.tasks_by_id.values()})
        return snapshot

    def _load_identity(self, loaded: LoadedConfig, digest: Any, watched: set[Path]) -> IdentityState | None:
        spec = loaded.settings.identity
        if spec is None:
            return None
        if spec.source == "workload_api":
            if self._workload_identity is None:
                raise ConfigError(str(loaded.source), "identity", "no identity from the Workload API yet")
            return self._workload_identity
        assert spec.files is not None

        def read(path: Path, field: str) -> bytes:
            watched.add(loaded.resolve(path))
            return self._read(loaded, path, field, digest)

        return load_identity_files(spec.files, read, file=str(loaded.source))

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

    def reload(self) -> bool:
        """Re-read the configuration and swap it in if it is valid and changed.

        Returns:
            ``True`` when a new snapshot is active. On error the previous snapshot stays active,
            ``last_error`` holds the message and a ``config_reload_failed`` event is logged.
        """
        previous = self.snapshot
        try:
            snapshot = self._build(previous)
        except ConfigError as exc:
            self.reload_failures += 1
            self.last_error = str(exc)
            _log.error("config_reload_failed", file=exc.file, field=exc.field, reason=exc.reason, code=exc.code)
            return False
        if snapshot.digest == previous.digest:
            return False
        self.snapshot = snapshot
        self.reloads += 1
        self.last_error = None
        _log.info(
            "config_reloaded",
            file=str(self.config_path),
            digest=snapshot.digest[:16],
            tasks=len(snapshot.policy.tasks_by_id),
        )
        return True

    def decide(self, request: AuthzRequest, decision_id: str) -> Decision:
        """Decide ``request`` against the active snapshot (read once, so a swap mid-call is harmless)."""
        snapshot = self.snapshot
        if request.protocol is not Protocol.HTTP:
            return decide_connection(
                snapshot.policy, request, now=self.clock(), decision_id=decision_id, budgets=self.budgets
            )
        if request.direction is Direction.EGRESS:
            identity = snapshot.identity
            bind = identity is not None and snapshot.loaded.settings.issuer.bind_to_svid
            return decide_egress(
                snapshot.policy,
                request,
                now=self.clock(),
                decision_id=decision_id,
                budgets=self.budgets,
                minter=snapshot.minter,
                cnf=identity.state.svid.x5t_s256 if bind and identity is not None else None,
            )
        return decide_ingress(
            snapshot.ingress,
            request,
            identity=snapshot.identity,
            agent=snapshot.policy.agent,
            now=self.clock(),
            decision_id=decision_id,
        )

    def jwks(self) -> dict[str, Any]:
        """The JWKS document of the active keys (RFC 7517 §5)."""
        return self.snapshot.keys.jwks(self.clock())
