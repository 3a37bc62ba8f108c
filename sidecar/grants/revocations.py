"""Signed revocation lists (``typ: agent-revocations+jwt``) and who may revoke what.

Payload: ``{"iss": signer, "revoked": [grant id, ...], "iat": NumericDate}``. Revoking a grant revokes
every grant below it (grants carry their ancestors' ids). A list is honoured for a grant only when
its signer had authority over that link (:func:`may_act_on`): a root issuer revokes anything; an
agent revokes grants it signed, grants below them, and its own grant (giving up authority). The
freeze ladder (:mod:`sidecar.control.ladder`) judges freezes and kills by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from sidecar.grants import codec
from sidecar.grants.model import REVOCATION_TYP, Grant, GrantCode, GrantError
from sidecar.identity.x509svid import X509SvidVerifier

__all__ = [
    "RevocationList",
    "may_act_on",
    "merge_revocations",
    "revoked_by",
    "sign_revocations",
    "verify_revocations",
]

_MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A verified revocation list: its signer, the revoked ids, and when it was issued."""

    signer: str
    ids: frozenset[str]
    issued_at: int
    root: bool
    token: str = field(repr=False)


def sign_revocations(
    ids: Iterable[str],
    key: PrivateKeyTypes,
    *,
    issuer: str,
    issued_at: int,
    kid: str | None = None,
    x5c: list[x509.Certificate] | None = None,
) -> str:
    """A compact JWS revocation list."""
    payload = {"iss": issuer, "revoked": sorted(set(ids)), "iat": issued_at}
    return codec.sign(payload, key, typ=REVOCATION_TYP, kid=kid, x5c=x5c)


def verify_revocations(
    token: str,
    *,
    root_keys: Mapping[str, PublicKeyTypes],
    root_ids: frozenset[str],
    svids: X509SvidVerifier | None,
    now: float,
) -> RevocationList:
    """Verify a revocation list.

    Raises:
        GrantError: as :func:`sidecar.grants.codec.verify`, or ``grant_malformed``.
    """
    signer, payload = codec.verify(token.strip(), typ=REVOCATION_TYP, root_keys=root_keys, svids=svids, now=now)
    revoked: Any = payload.get("revoked")
    issued_at = payload.get("iat")
    if not isinstance(revoked, list) or not all(isinstance(i, str) for i in revoked) or len(revoked) > _MAX_IDS:
        raise GrantError(GrantCode.MALFORMED, "revoked must be a list of grant ids")
    if not isinstance(issued_at, int):
        raise GrantError(GrantCode.MALFORMED, "iat must be an integer NumericDate")
    root = signer.startswith("key:") or signer in root_ids
    return RevocationList(signer, frozenset(revoked), issued_at, root, token.strip())


def merge_revocations(earlier: Iterable[RevocationList], later: Iterable[RevocationList]) -> tuple[RevocationList, ...]:
    """Lists received from one source, merged: a revocation once honoured stays (a later list from the
    same signer that omits an id does not un-revoke it).

    Lists are merged per signer and authority (``signer``, ``root``): the union of their ids, the
    latest ``issued_at``. A merged list that is not exactly one signed list has no ``token``.

    Returns:
        One list per ``(signer, root)``, sorted by signer.
    """
    merged: dict[tuple[str, bool], RevocationList] = {}
    for revocations in (*earlier, *later):
        key = (revocations.signer, revocations.root)
        seen = merged.get(key)
        if seen is None:
            merged[key] = revocations
            continue
        ids, issued_at = seen.ids | revocations.ids, max(seen.issued_at, revocations.issued_at)
        if ids == revocations.ids and issued_at == revocations.issued_at:
            merged[key] = revocations  # the later list says everything the earlier one did
        elif ids != seen.ids or issued_at != seen.issued_at:
            merged[key] = RevocationList(seen.signer, ids, issued_at, seen.root, "")
    return tuple(merged[key] for key in sorted(merged))


def may_act_on(signer: str, root: bool, links: Sequence[tuple[str, str]]) -> bool:
    """Whether ``signer`` has authority over a task: revoke it, freeze it, kill it.

    Args:
        signer: who signed (``key:<kid>`` or a SPIFFE ID).
        root: the signer is a root issuer (it may act on anything).
        links: ``(subject, signer)`` of the task's grant and of every grant above it, the task's
            first (a task from ``sidecar.yaml``: its agent and ``""``).

    Returns:
        ``True`` for a root issuer, the task's own agent (giving up its authority), or the signer of
        the task's grant or of a grant above it (who delegated it, directly or not).
    """
    return root or (bool(links) and signer == links[0][0]) or any(by == signer for _, by in links)


def revoked_by(grant: Grant, lists: Iterable[RevocationList]) -> RevocationList | None:
    """The first list that revokes ``grant`` (itself or an ancestor) with authority, or ``None``."""
    chain = grant.chain  # this grant first, root last
    for revocations in lists:
        for index, link in enumerate(chain):
            if link.id not in revocations.ids:
                continue
            if may_act_on(revocations.signer, revocations.root, [(g.subject, g.signer) for g in chain[index:]]):
                return revocations
    return None
