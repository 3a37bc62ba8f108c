"""The wire contract between the cluster authority and the sidecars: every name both sides spell the same way.

Two HTTPS listeners (:mod:`sidecar.authority.server`):

* **public** (server TLS only; stock verifiers, admins): per signing-key scope (one per namespace)
  the issuer ``<base>/ns/<namespace>`` serves ``<issuer>/.well-known/openid-configuration``
  (OpenID Connect Discovery 1.0 §3/§4, the subset a token verifier reads) and ``<issuer>/jwks.json``
  (RFC 7517 §5, with ``Cache-Control`` and ``ETag``); ``POST /v1/revocations`` takes lists signed by a
  root issuer (``agent-authz task revoke --authority``).
* **feed** (mTLS, the client's X.509-SVID required): ``GET /v1/feed`` is a Server-Sent Events stream
  (HTML Living Standard §9.2) of revocation entries and freeze/unfreeze/kill actions; ``POST
  /v1/revocations`` forwards a sidecar's own revocation with the grant that shows its authority;
  ``POST /v1/actions`` a sidecar's own ladder actions (its quarantines); ``POST /v1/keys`` announces
  the sidecar's public signing keys, each with a proof of possession.

Ladder actions (:mod:`sidecar.control.documents`, ``typ: agent-authz-action+jwt``) travel as the
compact JWS they are - ``{"actions": [jws, ...]}`` - so every sidecar verifies each one itself and
judges per task whether its signer had authority; the authority refuses ones that do not verify or
that the client did not sign (feed) or no root issuer signed (public), and keeps the rest.

Feed events (``event:`` then one ``data:`` line of JSON; ``id:`` is the revision):

* ``snapshot`` ``{"revision", "time", "entries": [entry...]}`` - every entry; the first event of
  each stream, and again whenever an entry was removed.
* ``revoked`` ``{"revision", "time", "entries": [entry...]}`` - entries added since the last event.
* ``heartbeat`` ``{"revision", "time"}`` - every ``feed.heartbeat`` seconds, so a client can tell a
  quiet feed from a dead one.
* ``actions`` ``{"revision", "time", "actions": [jws...]}`` - ladder actions added since the last
  event; a ``snapshot`` carries every action too (``"actions"``, absent from older authorities).

``revision`` is the ``resourceVersion`` of the revocations ConfigMap the event reflects; ``time`` the
authority's clock (POSIX seconds) when it sent the event.

Never rename a value: a sidecar of one version must keep working with the next authority.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from sidecar.errors import AgentAuthzError, ErrorCode
from sidecar.grants.revocations import RevocationList
from sidecar.tokens.keys import KeySet, SigningKey, thumbprint

__all__ = [
    "ACTIONS_PATH",
    "DISCOVERY_SUFFIX",
    "EVENT_ACTIONS",
    "EVENT_HEARTBEAT",
    "EVENT_REVOKED",
    "EVENT_SNAPSHOT",
    "FEED_PATH",
    "JWKS_SUFFIX",
    "KEYS_PATH",
    "KEY_PROOF_MAX_SKEW",
    "KEY_PROOF_TYP",
    "OPERATOR_SIGNER",
    "REVOCATIONS_PATH",
    "AuthorityCode",
    "AuthorityError",
    "RevocationEntry",
    "issuer_for",
    "key_announcement",
    "lists_from_entries",
    "namespace_of_issuer",
    "parse_entries",
    "public_key_of",
    "sign_key_proof",
    "verify_key_proof",
]

FEED_PATH = "/v1/feed"
"""The Server-Sent Events stream of revocation entries (feed listener, mTLS)."""
REVOCATIONS_PATH = "/v1/revocations"
"""``POST``: a signed revocation list (both listeners; see the module docstring for who may use which)."""
KEYS_PATH = "/v1/keys"
"""``POST``: a sidecar announces its public signing keys (feed listener, mTLS)."""
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
"""Appended to an issuer URL: its OpenID discovery document (OpenID Connect Discovery 1.0 §4)."""
JWKS_SUFFIX = "/jwks.json"
"""Appended to an issuer URL: its JWKS (the discovery document's ``jwks_uri``)."""
EVENT_SNAPSHOT = "snapshot"
EVENT_REVOKED = "revoked"
EVENT_HEARTBEAT = "heartbeat"
EVENT_ACTIONS = "actions"
ACTIONS_PATH = "/v1/actions"
"""``POST``: signed ladder actions (a root issuer's on the public listener, a sidecar's own on the feed one)."""
KEY_PROOF_TYP = "agent-authz-key-proof+jwt"
"""``typ`` of the JWS that proves a sidecar holds the private half of a key it announces."""
KEY_PROOF_MAX_SKEW = 300.0
"""Seconds a key proof's ``iat`` may differ from the authority's clock."""
OPERATOR_SIGNER = "operator"
"""The signer of entries an operator wrote into the revocations ConfigMap (its ``operator`` key)."""

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAX_ENTRIES = 100_000


class AuthorityCode(enum.StrEnum):
    """Why the authority refused something: the ``error`` of its answers and the ``detail`` of
    :class:`AuthorityError`. Never rename a value."""

    BAD_REQUEST = "bad_request"
    """The body is not what the route takes (not JSON, wrong shape, too large)."""
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    """A feed route reached without a client certificate."""
    PEER_NOT_ALLOWED = "peer_not_allowed"
    """The client's SVID is valid but names no workload of an agent namespace of this authority."""
    NOT_AUTHORIZED = "not_authorized"
    """The signer has no authority over that task (the sidecars' rules), or no grant shows it has."""
    SIGNER_NOT_PEER = "signer_not_peer"
    """A forwarded revocation list is signed by someone else than the client presenting it."""
    NOT_ROOT = "not_root"
    """The public listener takes only lists signed by a root issuer."""
    KEY_PROOF_INVALID = "key_proof_invalid"
    """A key announcement's proof of possession does not verify (signature, kid, issuer, subject, time)."""
    KEY_PRIVATE = "key_private"
    """An announced JWK carries private key material; nothing of it was stored."""
    UNKNOWN_NAMESPACE = "unknown_namespace"
    """No signing-key scope (namespace) of that name on this authority."""


class AuthorityError(AgentAuthzError):
    """The authority refused a request; ``detail`` is an :class:`AuthorityCode` (or a
    :class:`~sidecar.grants.model.GrantCode` value for a list or grant that does not verify)."""

    code = ErrorCode.AUTHORITY_REFUSED

    def __init__(self, detail: str, message: str, status: int = 400) -> None:
        self.detail = detail
        self.status = status
        super().__init__(f"{detail}: {message}")


def issuer_for(base_url: str, namespace: str) -> str:
    """The issuer URL (``iss`` of tokens) of ``namespace``'s signing key: ``<base>/ns/<namespace>``."""
    return f"{base_url.rstrip('/')}/ns/{namespace}"


def namespace_of_issuer(base_path: str, path: str, suffix: str) -> str | None:
    """The namespace in a request path ``<base path>/ns/<namespace><suffix>``, or ``None``."""
    prefix = f"{base_path.rstrip('/')}/ns/"
    if not path.startswith(prefix) or not path.endswith(suffix):
        return None
    namespace = path[len(prefix) : len(path) - len(suffix)]
    return namespace if _NAMESPACE.match(namespace) else None


@dataclass(frozen=True, slots=True, order=True)
class RevocationEntry:
    """One revoked task as the authority persists and streams it.

    Attributes:
        id: the task (grant) id; revoking it revokes everything delegated from it.
        signer: who revoked it: a SPIFFE ID, ``key:<kid>`` (a root issuer key) or ``operator``.
        root: the signer is a root issuer (or the operator): every sidecar honours it for any chain;
            otherwise a sidecar honours it only where the signer has authority over the chain
            (:func:`sidecar.grants.revocations.revoked_by`).
        revoked_at: POSIX seconds.
        expires_at: the revoked grant's expiry when known (the entry may be pruned after it), else ``None``.
    """

    id: str
    signer: str
    root: bool
    revoked_at: int
    expires_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the entry."""
        out: dict[str, Any] = {"id": self.id, "signer": self.signer, "root": self.root, "revoked_at": self.revoked_at}
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        return out

    @classmethod
    def from_json(cls, data: Any) -> RevocationEntry:
        """Parse one entry.

        Raises:
            ValueError: not an entry of the right shape.
        """
        if not isinstance(data, dict):
            raise ValueError("an entry is an object")
        entry_id, signer, root = data.get("id"), data.get("signer"), data.get("root")
        revoked_at, expires_at = data.get("revoked_at"), data.get("expires_at")
        if not isinstance(entry_id, str) or not entry_id or len(entry_id) > 256:
            raise ValueError("entry id must be a task id")
        if not isinstance(signer, str) or not signer or len(signer) > 2048:
            raise ValueError("entry signer must be a string")
        if not isinstance(root, bool):
            raise ValueError("entry root must be a boolean")
        if not isinstance(revoked_at, int) or isinstance(revoked_at, bool):
            raise ValueError("entry revoked_at must be an integer NumericDate")
        if expires_at is not None and (not isinstance(expires_at, int) or isinstance(expires_at, bool)):
            raise ValueError("entry expires_at must be an integer NumericDate or absent")
        return cls(entry_id, signer, root, revoked_at, expires_at)


def parse_entries(data: Any) -> tuple[RevocationEntry, ...]:
    """Parse a JSON list of entries (sorted, duplicates dropped).

    Raises:
        ValueError: not a list of entries, or more than 100,000.
    """
    if not isinstance(data, list) or len(data) > _MAX_ENTRIES:
        raise ValueError(f"entries must be a list of at most {_MAX_ENTRIES}")
    return tuple(sorted({RevocationEntry.from_json(item) for item in data}))


def lists_from_entries(entries: Iterable[RevocationEntry]) -> tuple[RevocationList, ...]:
    """The entries as the revocation lists a sidecar honours: one per ``(signer, root)``, so each entry
    is judged with its signer's authority (:func:`~sidecar.grants.revocations.revoked_by`)."""
    grouped: dict[tuple[str, bool], list[RevocationEntry]] = {}
    for entry in entries:
        grouped.setdefault((entry.signer, entry.root), []).append(entry)
    return tuple(
        RevocationList(signer, frozenset(e.id for e in group), max(e.revoked_at for e in group), root, "")
        for (signer, root), group in sorted(grouped.items())
    )


def public_key_of(jwk: Mapping[str, Any]) -> Any:
    """The ``cryptography`` public key of an EC P-256 or Ed25519 JWK (RFC 7518 §6.2, RFC 8037 §2).

    Raises:
        AuthorityError: ``key_private`` for a JWK with ``d``; ``key_proof_invalid`` for another type.
    """
    if "d" in jwk:
        raise AuthorityError(AuthorityCode.KEY_PRIVATE, "the JWK carries private key material ('d')")
    try:
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            return ECAlgorithm.from_jwk(dict(jwk))
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            return OKPAlgorithm.from_jwk(dict(jwk))
    except (jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, f"the JWK does not parse ({exc})") from None
    raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, "only EC P-256 and Ed25519 JWKs are published")


def sign_key_proof(key: SigningKey, *, issuer: str, subject: str, role: str, now: float | None = None) -> str:
    """A proof that the holder of ``key``'s private half announces it: a compact JWS signed with it.

    Payload: ``{"iss": issuer, "sub": the announcer's SPIFFE ID, "kid", "role", "iat"}``.
    """
    claims = {"iss": issuer, "sub": subject, "kid": key.kid, "role": role, "iat": int(now or time.time())}
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"typ": KEY_PROOF_TYP, "kid": key.kid})


def key_announcement(keys: KeySet, *, issuer: str, subject: str, now: float) -> dict[str, Any]:
    """The ``POST /v1/keys`` body for ``keys``: the current and next keys, each with its proof of
    possession (:func:`sign_key_proof`), and the retired keys still published (kid and until)."""
    items = [
        {
            "jwk": keys.current.public_jwk,
            "role": "current",
            "proof": sign_key_proof(keys.current, issuer=issuer, subject=subject, role="current", now=now),
        }
    ]
    if keys.next is not None and keys.next.kid != keys.current.kid:
        proof = sign_key_proof(keys.next, issuer=issuer, subject=subject, role="next", now=now)
        items.append({"jwk": keys.next.public_jwk, "role": "next", "proof": proof})
    retired = [{"kid": key.kid, "until": int(key.until)} for key in keys.retired if key.until > now]
    return {"keys": items, "retired": retired}


def verify_key_proof(proof: str, jwk: Mapping[str, Any], *, issuer: str, subject: str, now: float) -> dict[str, Any]:
    """Verify a key proof against the announced ``jwk``, the namespace's ``issuer`` and the peer ``subject``.

    Returns:
        The proof's claims.

    Raises:
        AuthorityError: ``key_private`` or ``key_proof_invalid`` (naming what does not match).
    """
    public = public_key_of(jwk)
    try:
        header = jwt.get_unverified_header(proof)
    except jwt.PyJWTError as exc:
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, f"not a compact JWS ({exc})") from None
    alg = "ES256" if jwk.get("kty") == "EC" else "EdDSA"
    if header.get("typ") != KEY_PROOF_TYP or header.get("alg") != alg or set(header) - {"typ", "alg", "kid"}:
        raise AuthorityError(
            AuthorityCode.KEY_PROOF_INVALID, f"the proof's header must be typ {KEY_PROOF_TYP}, alg {alg}"
        )
    try:
        options = {"verify_aud": False, "verify_iat": False, "verify_exp": False, "verify_nbf": False}
        claims: dict[str, Any] = jwt.decode(proof, public, algorithms=[alg], options=options)  # type: ignore[arg-type]
    except jwt.PyJWTError as exc:
        raise AuthorityError(
            AuthorityCode.KEY_PROOF_INVALID, f"the proof does not verify with the key ({exc})"
        ) from None
    kid = thumbprint(dict(jwk))
    if claims.get("kid") != kid or header.get("kid") != kid or jwk.get("kid", kid) != kid:
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, "kid must be the key's RFC 7638 thumbprint")
    if claims.get("iss") != issuer:
        raise AuthorityError(
            AuthorityCode.KEY_PROOF_INVALID,
            f"the key is for issuer {claims.get('iss')!r}, this namespace's is {issuer!r}",
        )
    if claims.get("sub") != subject:
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, "the proof names another workload than the client")
    iat = claims.get("iat")
    if not isinstance(iat, int) or abs(iat - now) > KEY_PROOF_MAX_SKEW:
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, "the proof's iat is missing or too far from now")
    if claims.get("role") not in ("current", "next"):
        raise AuthorityError(AuthorityCode.KEY_PROOF_INVALID, "role must be current or next")
    return claims
