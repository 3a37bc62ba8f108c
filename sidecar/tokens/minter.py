"""Token exchange on egress: task-scoped access tokens.

For each allowed call the agent's identity is exchanged for a JWT shaped as an RFC 9068 access
token (header ``typ: at+jwt``) for exactly that destination::

    {"iss": issuer, "sub": on_behalf_of or agent, "act": {"sub": agent}, "client_id": agent,
     "aud": audience, "scope": scope, "txn": task_id, "sensitivity": label, "iat", "nbf", "exp", "jti"}

``act`` follows RFC 8693 §4.1 (the current actor is outermost); ``txn`` carries the task id as the
OAuth Transaction Tokens draft does. ``sensitivity`` (a private claim, RFC 7519 §4.3) is the label of
what the call reaches (``public``, ``internal``, ``confidential`` or ``restricted``: the rule's or the
host's, else ``sensitivity.default``), so an upstream can refuse a token labelled below its data.
NumericDates are integers (RFC 7519 §2). ``exp`` is never later than the task's expiry nor
``iat + max_token_ttl``.

Tokens are cached per (task, audience, scope, sensitivity, key) and refreshed ahead of expiry, so
the request path normally signs nothing.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from sidecar.decision import TokenInfo
from sidecar.tokens.keys import SigningKey

__all__ = ["MintedToken", "TokenCache", "TokenMinter", "b64url_length"]

_SIGNATURE_BYTES = 64
"""ES256 (r || s, RFC 7518 §3.4) and EdDSA (Ed25519, RFC 8037 §3.1) signatures: 64 bytes each."""
_WIDEST_DATE = 99_999_999_999
"""A NumericDate wider than any ``iat``/``nbf``/``exp`` minted before the year 5138."""
_JTI_LENGTH = 22
"""``secrets.token_urlsafe(16)``."""
_CNF_LENGTH = 43
"""A base64url SHA-256 thumbprint (RFC 8705 §3.1)."""


def b64url_length(size: int) -> int:
    """Length of the unpadded base64url form of ``size`` bytes (RFC 7515 §2)."""
    return (4 * size + 2) // 3


@dataclass(frozen=True, slots=True)
class MintedToken:
    """A compact JWS and what may be logged about it."""

    token: str
    info: TokenInfo
    refresh_at: float
    exp: float


CacheKey = tuple[str, str, str, str, str]


class TokenCache:
    """Tokens by ``(task_id, task_fingerprint, audience, scope, kid)``; shared across reloads.

    Attributes:
        minted: tokens signed so far (on the request path and in background refreshes).
        hits: tokens served from the cache.
    """

    __slots__ = ("_entries", "_pending", "hits", "minted")

    def __init__(self) -> None:
        self._entries: dict[CacheKey, MintedToken] = {}
        self._pending: set[CacheKey] = set()
        self.minted = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def retain(self, fingerprints: set[tuple[str, str]]) -> None:
        """Drop entries whose ``(task_id, fingerprint)`` is no longer declared (revoked, changed)."""
        for key in [k for k in self._entries if (k[0], k[1]) not in fingerprints]:
            del self._entries[key]


class TokenMinter:
    """Mints and caches task-scoped tokens with one signing key.

    Args:
        key: the current signing key.
        issuer: the ``iss`` claim.
        max_ttl: upper bound of a token's lifetime in seconds.
        refresh_ahead: fraction of the lifetime left at which a cached token is re-minted.
        per_call: mint a fresh token on every call (no cache).
        cache: shared :class:`TokenCache`.
        defer: schedules a background refresh (e.g. ``loop.call_soon``); ``None`` refreshes inline.
        clock: POSIX seconds, for background refreshes.
    """

    __slots__ = ("_cache", "_clock", "_defer", "_issuer", "_key", "_max_ttl", "_per_call", "_refresh_ahead", "minted")

    def __init__(
        self,
        key: SigningKey,
        issuer: str,
        max_ttl: float,
        refresh_ahead: float,
        per_call: bool,
        cache: TokenCache,
        defer: Callable[[Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._issuer = issuer
        self._max_ttl = max_ttl
        self._refresh_ahead = refresh_ahead
        self._per_call = per_call
        self._cache = cache
        self._defer = defer
        self._clock = clock
        self.minted = 0

    def _mint(self, claims: dict[str, Any], expires_at: float, now: float) -> MintedToken:
        iat = int(now)
        exp = max(iat, math.floor(min(now + self._max_ttl, expires_at)))
        jti = secrets.token_urlsafe(16)
        payload = {**claims, "iat": iat, "nbf": iat, "exp": exp, "jti": jti}
        token = jwt.encode(
            payload,
            self._key.private_key,
            algorithm=self._key.algorithm,
            headers={"kid": self._key.kid, "typ": "at+jwt"},
        )
        self.minted += 1
        self._cache.minted += 1
        refresh_at = exp - (exp - iat) * self._refresh_ahead
        return MintedToken(token, TokenInfo(jti=jti, aud=str(claims["aud"]), exp=exp, cached=False), refresh_at, exp)

    def size_bound(
        self,
        *,
        subject: str,
        actor: Mapping[str, Any],
        client_id: str,
        audience: str,
        scope: str | None,
        txn: str,
        cnf: bool,
    ) -> int:
        """The length in bytes of the longest token :meth:`token_for` can mint with these claims (any
        time, any ``jti``; with ``cnf``, an SVID thumbprint): the JWS header and payload as PyJWT
        encodes them (compact JSON, ASCII-escaped, RFC 7515 §7.1), and the signature."""
        claims = self._claims(subject, actor, client_id, audience, scope, txn, "A" * _CNF_LENGTH if cnf else None)
        widest = {**claims, "iat": _WIDEST_DATE, "nbf": _WIDEST_DATE, "exp": _WIDEST_DATE, "jti": "A" * _JTI_LENGTH}
        header = {"typ": "at+jwt", "alg": self._key.algorithm, "kid": self._key.kid}
        encoded = (len(json.dumps(part, separators=(",", ":"))) for part in (header, widest))
        return sum(b64url_length(n) for n in encoded) + b64url_length(_SIGNATURE_BYTES) + 2

    @staticmethod
    def _for_cache(minted: MintedToken) -> MintedToken:
        """The entry kept in the cache: the same token, reported as served from the cache."""
        info = minted.info
        return MintedToken(minted.token, TokenInfo(info.jti, info.aud, info.exp, True), minted.refresh_at, minted.exp)

    def token_for(
        self,
        *,
        task_id: str,
        txn: str,
        task_fingerprint: str,
        task_expires_at: float,
        subject: str,
        actor: Mapping[str, Any],
        client_id: str,
        audience: str,
        scope: str | None,
        now: float,
        cnf: str | None = None,
        sensitivity: str | None = None,
    ) -> MintedToken:
        """Return a valid token for this task and destination, from cache when possible.

        Args:
            task_id / task_fingerprint / task_expires_at: the task (expiry in POSIX seconds).
            txn: the ``txn`` claim: the task id, or the root task's id for a delegated task.
            subject: ``sub`` - the principal the task serves, or the agent.
            actor: the ``act`` claim (RFC 8693 §4.1), e.g. ``{"sub": agent_spiffe_id}``.
            client_id: RFC 9068 ``client_id`` (the agent's SPIFFE ID).
            audience / scope: ``aud`` and ``scope``.
            now: POSIX seconds.
            cnf: SHA-256 thumbprint (base64url) of the agent's X.509-SVID to bind the token to
                (``cnf: {"x5t#S256": ...}``, RFC 8705 §3.1), or ``None``.
            sensitivity: the ``sensitivity`` claim (the destination's label), or ``None``.

        Returns:
            A :class:`MintedToken`; ``info.cached`` says whether it came from the cache.
        """
        scoped = (scope or "") if sensitivity is None else f"{scope or ''}\0{sensitivity}"
        key: CacheKey = (task_id, task_fingerprint, audience, scoped, self._key.kid + (cnf or ""))
        hit = None if self._per_call else self._cache._entries.get(key)
        if hit is not None and now < hit.exp - 1:
            if now >= hit.refresh_at and key not in self._cache._pending:
                claims = self._claims(subject, actor, client_id, audience, scope, txn, cnf, sensitivity)
                self._refresh(key, claims, task_expires_at)
            self._cache.hits += 1
            return hit
        claims = self._claims(subject, actor, client_id, audience, scope, txn, cnf, sensitivity)
        fresh = self._mint(claims, task_expires_at, now)
        if not self._per_call:
            self._cache._entries[key] = self._for_cache(fresh)
        return fresh

    def _claims(
        self,
        subject: str,
        actor: Mapping[str, Any],
        client_id: str,
        audience: str,
        scope: str | None,
        txn: str,
        cnf: str | None,
        sensitivity: str | None = None,
    ) -> dict[str, Any]:
        claims: dict[str, Any] = {"iss": self._issuer, "sub": subject, "act": dict(actor), "client_id": client_id}
        claims["aud"] = audience
        if scope:
            claims["scope"] = scope
        claims["txn"] = txn
        if sensitivity:
            claims["sensitivity"] = sensitivity
        if cnf:
            claims["cnf"] = {"x5t#S256": cnf}
        return claims

    def _refresh(self, key: CacheKey, claims: dict[str, Any], expires_at: float) -> None:
        def run() -> None:
            try:
                self._cache._entries[key] = self._for_cache(self._mint(claims, expires_at, self._clock()))
            finally:
                self._cache._pending.discard(key)

        self._cache._pending.add(key)
        if self._defer is None:
            run()
        else:
            self._defer(run)
