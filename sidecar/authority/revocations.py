"""The authority's revocations: who may revoke what (the sidecars' own rules), persisted, and fanned out.

**Judging** (:class:`RevocationJudge`). A revocation reaches the authority as a signed revocation list
(``typ: agent-revocations+jwt``, :mod:`sidecar.grants.revocations`) and, unless a root issuer signed
it, with the grants that show the signer's authority. The list is verified exactly as a sidecar
verifies one; each id is then accepted only when one of the presented grants (verified, chain and
attenuation included, by :class:`~sidecar.grants.verify.GrantVerifier`) has that id in its chain and
:func:`~sidecar.grants.revocations.revoked_by` says the signer may revoke that link: a root issuer
revokes anything; an agent revokes what it signed, what lies below it, and its own grant. Anything
else is refused with ``not_authorized`` - never stored, and recorded.

**Persisting** (:class:`RevocationStore`). Entries live in one ConfigMap the chart installs, under
two keys:

* ``revocations.json`` - ``{"entries": [entry, ...]}`` written by the authority replicas
  (:class:`~sidecar.authority.protocol.RevocationEntry`; sorted, one per ``(id, signer)``), changed
  only through :class:`~sidecar.authority.documents.ConfigMapDocument` (409 Conflict → merged into the
  newer version, so two replicas never drop each other's entries).
* ``operator`` - one task id per line (``#`` comments), edited by operators with ``kubectl edit`` or
  ``kubectl patch``: a root revocation whose authority is Kubernetes RBAC on that ConfigMap
  (signer ``operator``).
* ``actions`` - signed freeze/unfreeze/kill actions, one compact JWS per line (:data:`ACTIONS_KEY`),
  kept for good (every sidecar verifies each one itself; the set only grows, at most
  :data:`MAX_ACTIONS`).

An entry whose grant has expired is pruned ``prune_after`` after the expiry, on the next write.
Every replica watches the ConfigMap; each change is passed to the listeners as the entries added
and removed, and the feed fans it out.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.authority.documents import ConfigMapDocument
from sidecar.authority.kube import KubeClient
from sidecar.authority.protocol import (
    OPERATOR_SIGNER,
    AuthorityCode,
    AuthorityError,
    RevocationEntry,
    parse_entries,
)
from sidecar.grants.model import Grant, GrantError
from sidecar.grants.revocations import RevocationList, revoked_by, verify_revocations
from sidecar.grants.verify import GrantVerifier
from sidecar.identity.x509svid import X509SvidVerifier

__all__ = [
    "ACTIONS_KEY",
    "DATA_KEY",
    "MAX_ACTIONS",
    "OPERATOR_KEY",
    "Judgement",
    "Refusal",
    "RevocationJudge",
    "RevocationStore",
    "actions_of",
    "entries_of",
]

_log = structlog.get_logger("agent_authz.authority.revocations")
DATA_KEY = "revocations.json"
OPERATOR_KEY = "operator"
ACTIONS_KEY = "actions"
MAX_ACTIONS = 10_000
"""Ladder actions kept in the ConfigMap (the oldest lines go first beyond it)."""
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")
_MAX_GRANTS = 64


@dataclass(frozen=True, slots=True)
class Refusal:
    """One id of a list that was not accepted, and why (``error`` an AuthorityCode or GrantCode value)."""

    id: str
    error: str
    detail: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the authority makes of one submitted list."""

    signer: str
    root: bool
    accepted: tuple[RevocationEntry, ...]
    refused: tuple[Refusal, ...]


class RevocationJudge:
    """Verifies submitted revocation lists and decides, id by id, whether the signer may revoke it.

    Args:
        root_keys: ``kid`` -> public key of the root issuer keys.
        root_ids: SPIFFE IDs of root issuers signing with their SVID.
        svids: verifies ``x5c`` signatures against the trust bundles.
        max_depth: longest delegation chain of a presented grant.
    """

    def __init__(
        self,
        *,
        root_keys: Mapping[str, PublicKeyTypes],
        root_ids: frozenset[str],
        svids: X509SvidVerifier,
        max_depth: int,
    ) -> None:
        self.root_keys = dict(root_keys)
        self.root_ids = root_ids
        self.svids = svids
        self.grants = GrantVerifier(root_keys=root_keys, root_ids=root_ids, svids=svids, max_depth=max_depth)

    def judge(self, token: str, grants: Sequence[str], *, peer: str | None, now: float) -> Judgement:
        """Judge one list.

        Args:
            token: the signed revocation list.
            grants: compact JWS grants that show the signer's authority (at most 64).
            peer: the SPIFFE ID of the mTLS client that presented it, or ``None`` on the public
                listener (where only root issuers' lists are taken).
            now: POSIX seconds.

        Raises:
            AuthorityError: the list does not verify (``detail`` the GrantCode), ``not_root`` on the
                public listener, ``signer_not_peer`` for a list another workload signed,
                ``bad_request`` for too many grants.
        """
        try:
            revocations = verify_revocations(
                token, root_keys=self.root_keys, root_ids=self.root_ids, svids=self.svids, now=now
            )
        except GrantError as exc:
            raise AuthorityError(exc.detail, str(exc), 400) from None
        if peer is None and not revocations.root:
            raise AuthorityError(
                AuthorityCode.NOT_ROOT, "the public listener takes only lists signed by a root issuer", 403
            )
        if peer is not None and not revocations.root and revocations.signer != peer:
            raise AuthorityError(
                AuthorityCode.SIGNER_NOT_PEER, f"the list is signed by {revocations.signer}, the client is {peer}", 403
            )
        if len(grants) > _MAX_GRANTS:
            raise AuthorityError(AuthorityCode.BAD_REQUEST, f"at most {_MAX_GRANTS} grants", 400)
        verified: list[Grant] = []
        problems: list[str] = []
        for grant_token in grants:
            try:
                verified.append(self.grants.verify(grant_token, now=now))
            except GrantError as exc:
                problems.append(str(exc))
        accepted: list[RevocationEntry] = []
        refused: list[Refusal] = []
        for task_id in sorted(revocations.ids):
            link = self._authorizing_link(revocations, task_id, verified)
            if link is not None or revocations.root:
                expires = int(link.expires_at) if link is not None else None
                accepted.append(
                    RevocationEntry(task_id, revocations.signer, revocations.root, revocations.issued_at, expires)
                )
                continue
            holds = any(task_id in (g.id for g in grant.chain) for grant in verified)
            detail = (
                f"{revocations.signer} has no authority over {task_id!r}: it neither holds it, signed it, nor "
                "signed a grant above it"
                if holds
                else f"no verified grant with {task_id!r} in its chain shows {revocations.signer}'s authority"
                + (f" ({'; '.join(problems)})" if problems else "")
            )
            refused.append(Refusal(task_id, AuthorityCode.NOT_AUTHORIZED, detail))
        return Judgement(revocations.signer, revocations.root, tuple(accepted), tuple(refused))

    @staticmethod
    def _authorizing_link(revocations: RevocationList, task_id: str, grants: Iterable[Grant]) -> Grant | None:
        """The link ``task_id`` of a presented chain over which the list's signer has authority."""
        single = RevocationList(revocations.signer, frozenset({task_id}), revocations.issued_at, revocations.root, "")
        for grant in grants:
            for link in grant.chain:
                if link.id == task_id and revoked_by(grant, [single]) is not None:
                    return link
        return None


def entries_of(data: Mapping[str, str]) -> frozenset[RevocationEntry]:
    """The entries a revocations ConfigMap's data holds (``revocations.json`` and ``operator`` lines).

    Raises:
        ValueError: ``revocations.json`` is not a document of entries (the operator lines never
            raise: an invalid line can name no task and is skipped with a warning).
    """
    entries: set[RevocationEntry] = set()
    raw = data.get(DATA_KEY, "")
    if raw.strip():
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError(f"{DATA_KEY} must be an object")
        entries.update(parse_entries(document.get("entries", [])))
    for number, line in enumerate(data.get(OPERATOR_KEY, "").splitlines(), 1):
        task_id = line.split("#", 1)[0].strip()
        if not task_id:
            continue
        if not _TASK_ID.match(task_id):
            _log.warning("operator_line_skipped", line=number, reason="not a task id")
            continue
        entries.add(RevocationEntry(task_id, OPERATOR_SIGNER, True, 0))
    return frozenset(entries)


def _document(entries: Iterable[RevocationEntry]) -> str:
    return json.dumps({"entries": [e.to_json() for e in sorted(entries)]}, separators=(",", ":"), sort_keys=True)


Listener = Callable[[frozenset[RevocationEntry], frozenset[RevocationEntry], str], None]
ActionListener = Callable[[tuple[str, ...], str], None]


def actions_of(data: Mapping[str, str]) -> tuple[str, ...]:
    """The signed ladder actions a revocations ConfigMap's data holds (one compact JWS per line, in order)."""
    return tuple(dict.fromkeys(line.strip() for line in data.get(ACTIONS_KEY, "").splitlines() if line.strip()))


class RevocationStore:
    """The revocation entries of the cluster, in a ConfigMap, kept current by a watch.

    Args:
        client: the Kubernetes API client.
        configmap: the revocations ConfigMap's name.
        prune_after: seconds after a grant's expiry its entry is dropped (on the next write).
        max_retries: read-modify-write attempts per change.
        watch_timeout: seconds of each watch request.
        clock: POSIX seconds.

    Attributes:
        entries: every entry (``revocations.json`` and ``operator``) of the latest version.
        revision: that version's ``resourceVersion``.
        document: the ConfigMap document (conflict and watch counters).
        listeners: called with ``(added, removed, revision)`` after each change.
        actions: the signed ladder actions of the latest version, in order.
        action_listeners: called with ``(added actions, revision)`` when actions were added.
        last_error: why the latest version could not be read (its entries are then kept), or ``None``.
    """

    def __init__(
        self,
        client: KubeClient,
        configmap: str,
        *,
        prune_after: float = 600.0,
        max_retries: int = 20,
        watch_timeout: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries: frozenset[RevocationEntry] = frozenset()
        self.revision = ""
        self.listeners: list[Listener] = []
        self.actions: tuple[str, ...] = ()
        self.action_listeners: list[ActionListener] = []
        self.last_error: str | None = None
        self._prune_after = prune_after
        self._clock = clock
        self.document = ConfigMapDocument(
            client, configmap, on_change=self._changed, max_retries=max_retries, watch_timeout=watch_timeout
        )

    def _changed(self, data: Mapping[str, str], revision: str) -> None:
        actions = actions_of(data)
        known = set(self.actions)
        added_actions = tuple(a for a in actions if a not in known)
        if added_actions:
            self.actions = (*self.actions, *added_actions)  # never taken back: an action is for good
            for action_listener in self.action_listeners:
                action_listener(added_actions, revision)
        try:
            entries = entries_of(data)
        except ValueError as exc:
            self.last_error = f"{DATA_KEY}: {exc}"
            _log.error("revocations_unreadable", configmap=self.document.name, error=self.last_error)
            return  # fail closed: keep every entry known so far
        self.last_error = None
        added, removed = entries - self.entries, self.entries - entries
        self.entries, self.revision = entries, revision
        if added or removed:
            for listener in self.listeners:
                listener(frozenset(added), frozenset(removed), revision)

    async def add(self, entries: Iterable[RevocationEntry]) -> str:
        """Persist ``entries`` (those not yet present, by ``(id, signer)``) and return the revision
        that holds them; the listeners of this replica hear of them at once.

        Raises:
            KubeApiError: the ConfigMap could not be written (still conflicting after the retries,
                forbidden, unreachable).
            ValueError: ``revocations.json`` is unreadable (nothing is written over it).
        """
        wanted = list(entries)
        now = self._clock()

        def merge(data: dict[str, str]) -> dict[str, str] | None:
            raw = data.get(DATA_KEY, "")
            document = json.loads(raw) if raw.strip() else {}
            current = set(parse_entries(document.get("entries", []))) if isinstance(document, dict) else None
            if current is None:
                raise ValueError(f"{DATA_KEY} must be an object")
            keys = {(e.id, e.signer) for e in current}
            new = {e for e in wanted if (e.id, e.signer) not in keys}
            kept = {e for e in current if e.expires_at is None or e.expires_at + self._prune_after > now}
            if not new and kept == current:
                return None
            data[DATA_KEY] = _document(kept | new)
            return data

        await self.document.update(merge)
        return self.document.resource_version

    async def add_actions(self, actions: Iterable[str]) -> str:
        """Persist signed ladder actions (those not yet present) and return the revision that holds them.

        Raises:
            KubeApiError: the ConfigMap could not be written.
        """
        wanted = list(dict.fromkeys(actions))

        def merge(data: dict[str, str]) -> dict[str, str] | None:
            current = list(actions_of(data))
            new = [a for a in wanted if a not in set(current)]
            if not new:
                return None
            data[ACTIONS_KEY] = "".join(line + "\n" for line in (current + new)[-MAX_ACTIONS:])
            return data

        await self.document.update(merge)
        return self.document.resource_version
