"""Load the grants a sidecar holds and the revocation lists it honours.

Grants come from ``grants.files`` (watched, like every file the config names) and from
``POST /v1/tasks``; revocation lists from ``grants.revocations`` files and from this sidecar's own
revocations (``POST /v1/tasks/{id}/revoke``). A file grant that fails verification, names another
agent, or needs a credential this sidecar does not hold is a configuration error (the previous
configuration stays active). A missing revocation file counts as an empty list: the publisher may
not have revoked anything yet.

Revocation lists are remembered per source (:func:`revocation_source`): what a source revoked once
stays revoked when its file later shrinks, vanishes or stops being configured, and the durable
state keeps it across restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.config.schema import GrantsSpec
from sidecar.errors import KeyLoadError
from sidecar.grants.model import Grant, GrantCode, GrantError
from sidecar.grants.revocations import RevocationList, merge_revocations, verify_revocations
from sidecar.grants.verify import GrantVerifier
from sidecar.identity.state import parse_jwt_bundle
from sidecar.identity.x509svid import X509SvidVerifier

__all__ = ["GrantSet", "check_grant_usable", "load_grants", "revocation_source"]

_log = structlog.get_logger("agent_authz.grants")

Reader = Callable[[Path, str], bytes]


Received = Mapping[str, tuple[RevocationList, ...]]
"""Revocation lists received, by source (:func:`revocation_source`), merged per signer."""


def revocation_source(path: Path) -> str:
    """The source name of the revocation lists read from ``grants.revocations`` file ``path``
    (``file:<path as configured>``; other kinds of sources get other prefixes)."""
    return f"file:{path}"


@dataclass(frozen=True)
class GrantSet:
    """The verifier, the accepted grants and the revocation lists of one configuration.

    Attributes:
        verifier: verifies grants against the root issuers and the trust bundles.
        grants: the accepted grants (files, then posted).
        revocations: every list honoured: this sidecar's own, then each source's.
        received: the lists received, by source: the earlier ones merged with what was read now.
    """

    verifier: GrantVerifier
    grants: tuple[Grant, ...]
    revocations: tuple[RevocationList, ...]
    received: Received = field(default_factory=dict)


def check_grant_usable(grant: Grant, agent: str, credentials: Mapping[str, object]) -> None:
    """A grant this sidecar can enforce: for its agent, naming only credentials it holds.

    Raises:
        GrantError: ``grant_wrong_subject`` or ``grant_unknown_credential``.
    """
    if grant.subject != agent:
        raise GrantError(GrantCode.WRONG_SUBJECT, f"the grant is for {grant.subject}, this agent is {agent}")
    for index, rule in enumerate(grant.spec.egress):
        if isinstance(rule.credential, str) and rule.credential not in credentials:
            raise GrantError(
                GrantCode.UNKNOWN_CREDENTIAL, f"egress[{index}] names credential {rule.credential!r}, not held here"
            )


def load_grants(
    spec: GrantsSpec,
    read: Reader,
    exists: Callable[[Path], bool],
    *,
    file: str,
    svids: X509SvidVerifier | None,
    agent: str,
    credentials: Mapping[str, object],
    posted: Mapping[str, str],
    own_revocations: RevocationList | None,
    now: float,
    received: Received | None = None,
) -> GrantSet:
    """Verify file grants, posted grants and revocation lists.

    Args:
        spec: the ``grants`` section.
        read: reads a configured file ``(path, field) -> bytes`` and records it for hot reload.
        exists: whether a configured path exists.
        file: the config file, for errors.
        svids: X.509-SVID verifier over the trust bundles (``None`` without an identity source).
        agent: this agent's SPIFFE ID.
        credentials: names of the credentials this sidecar holds.
        posted: grants accepted through ``POST /v1/tasks`` (id -> compact JWS).
        own_revocations: this sidecar's own revocations, if any.
        now: POSIX seconds.
        received: lists received earlier, by source (honoured with what the files say now).

    Raises:
        KeyLoadError: a file grant or revocation list is unreadable or invalid (the field is named).
    """
    root_keys: dict[str, PublicKeyTypes] = {}
    root_ids: set[str] = set()
    for index, issuer in enumerate(spec.root_issuers):
        if issuer.spiffe_id is not None:
            root_ids.add(issuer.spiffe_id)
            continue
        assert issuer.jwks is not None
        field_name = f"grants.root_issuers[{index}].jwks"
        try:
            root_keys.update(parse_jwt_bundle(read(issuer.jwks, field_name)))
        except ValueError as exc:
            raise KeyLoadError(file, field_name, str(exc)) from None
    verifier = GrantVerifier(root_keys=root_keys, root_ids=frozenset(root_ids), svids=svids, max_depth=spec.max_depth)

    grants: list[Grant] = []
    for index, path in enumerate(spec.files):
        field_name = f"grants.files[{index}]"
        try:
            grant = verifier.verify(read(path, field_name).decode("ascii", "replace").strip(), now=now)
            check_grant_usable(grant, agent, credentials)
        except GrantError as exc:
            raise KeyLoadError(file, field_name, str(exc)) from None
        grants.append(grant)
    for grant_id, token in posted.items():
        try:
            grant = verifier.verify(token, now=now)
            check_grant_usable(grant, agent, credentials)
        except GrantError as exc:  # it verified when posted; bundles or credentials changed since
            _log.error("posted_grant_dropped", task_id=grant_id, reason=str(exc))
            continue
        grants.append(grant)

    merged: dict[str, tuple[RevocationList, ...]] = dict(received or {})
    for index, path in enumerate(spec.revocations):
        field_name = f"grants.revocations[{index}]"
        if not exists(path):
            continue
        try:
            current = verify_revocations(
                read(path, field_name).decode("ascii", "replace"),
                root_keys=root_keys,
                root_ids=frozenset(root_ids),
                svids=svids,
                now=now,
            )
        except GrantError as exc:
            raise KeyLoadError(file, field_name, str(exc)) from None
        source = revocation_source(path)
        merged[source] = merge_revocations(merged.get(source, ()), (current,))
    lists: list[RevocationList] = [] if own_revocations is None else [own_revocations]
    for source in sorted(merged):
        lists.extend(merged[source])
    return GrantSet(verifier, tuple(grants), tuple(lists), merged)
