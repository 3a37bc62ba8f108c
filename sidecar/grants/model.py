"""The grant value and its errors.

A grant is a compact JWS with header ``typ: agent-task+jwt`` whose payload declares one task::

    {"iss": signer, "sub": subject SPIFFE ID, "jti": grant (task) id, "txn": root grant id,
     "iat", "nbf", "exp",                                   # NumericDates (RFC 7519 §2)
     "task": {"purpose", "on_behalf_of", "max_calls", "max_sensitivity", "quarantine",
              "egress": [rule, ...]},
     "ancestors": [root id, ..., parent id],                # empty for a root grant
     "parent": "<compact JWS of the parent grant>"}         # absent for a root grant

A root grant is signed by a configured root issuer (a key by ``kid``, or a listed SPIFFE ID with its
X.509-SVID in ``x5c``). A delegated grant is signed by the parent grant's subject with its
X.509-SVID (``x5c``, RFC 7515 §4.1.6) and embeds its parent, so any sidecar that trusts the bundles
can verify the whole chain offline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sidecar.config.schema import TaskSpec
from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = ["GRANT_TYP", "REVOCATION_TYP", "Grant", "GrantCode", "GrantError"]

GRANT_TYP = "agent-task+jwt"
REVOCATION_TYP = "agent-revocations+jwt"


class GrantCode(enum.StrEnum):
    """Why a grant, a delegation or a revocation list was refused: the ``detail`` of
    :class:`GrantError`, and the ``error`` of the task API's answers. Never rename a value."""

    BAD_HEADER = "grant_bad_header"
    BAD_SIGNATURE = "grant_bad_signature"
    BROKEN_CHAIN = "grant_broken_chain"
    DUPLICATE = "grant_duplicate"
    EXPIRED = "grant_expired"
    MALFORMED = "grant_malformed"
    NOT_DELEGABLE = "grant_not_delegable"
    NOT_ROOT_ISSUER = "grant_not_root_issuer"
    REJECTED = "grant_rejected"
    TOO_DEEP = "grant_too_deep"
    UNKNOWN_CREDENTIAL = "grant_unknown_credential"
    UNKNOWN_TASK = "grant_unknown_task"
    UNTRUSTED_SIGNER = "grant_untrusted_signer"
    WIDENING = "grant_widening"
    WRONG_SIGNER = "grant_wrong_signer"
    WRONG_SUBJECT = "grant_wrong_subject"


class GrantError(AgentAuthzError):
    """A grant (or revocation list) was refused. ``detail`` is a stable :class:`GrantCode` such as
    ``grant_bad_signature``, ``grant_wrong_subject`` or ``grant_widening``."""

    code = ErrorCode.GRANT_INVALID

    def __init__(self, detail: GrantCode, message: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}: {message}")


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified grant (its chain verified too).

    Attributes:
        id: the grant id, also the task id.
        subject: the SPIFFE ID the task belongs to.
        signer: who signed it: a SPIFFE ID (``x5c``) or ``key:<kid>`` (root issuer key).
        txn: the root grant's id (the ``txn`` of every token minted under the chain).
        ancestors: ids from the root to the parent.
        not_before / expires_at: POSIX seconds.
        spec: the task as a validated :class:`TaskSpec` (``id`` = ``jti``, ``agent`` = ``sub``).
        parent: the verified parent grant, ``None`` for a root grant.
        token: the compact JWS (not in ``repr``).
    """

    id: str
    subject: str
    signer: str
    txn: str
    ancestors: tuple[str, ...]
    not_before: float
    expires_at: float
    spec: TaskSpec
    parent: Grant | None
    token: str = field(repr=False)

    @property
    def depth(self) -> int:
        """0 for a root grant."""
        return len(self.ancestors)

    @property
    def chain(self) -> tuple[Grant, ...]:
        """This grant and its ancestors, this one first."""
        out: list[Grant] = []
        grant: Grant | None = self
        while grant is not None:
            out.append(grant)
            grant = grant.parent
        return tuple(out)

    @property
    def actors(self) -> tuple[str, ...]:
        """SPIFFE IDs of the actors, current first (the nesting order of ``act``, RFC 8693 §4.1)."""
        return tuple(g.subject for g in self.chain)

    def act_claim(self) -> dict[str, object]:
        """The nested ``act`` claim: the current actor outermost, prior actors nested inside."""
        claim: dict[str, object] | None = None
        for actor in reversed(self.actors):
            claim = {"sub": actor} if claim is None else {"sub": actor, "act": claim}
        assert claim is not None
        return claim
