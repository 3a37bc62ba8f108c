"""Public signing keys per namespace, announced by the sidecars, and the JWKS and discovery documents.

**Where the keys come from.** The authority never reads a private key. Each sidecar announces the
public halves of its keys over the authenticated feed listener (``POST /v1/keys``):

* the client is identified by its X.509-SVID (mTLS), and its SPIFFE ID names its namespace
  (``trust.spiffe_id_template``): a key is accepted **only for that namespace** - a workload of
  namespace B can never put a key into A's JWKS;
* each ``current`` or ``next`` key comes with a **proof of possession**: a JWS over ``{iss, sub,
  kid, role, iat}`` signed with that very key, whose ``iss`` is the namespace's issuer and ``sub`` the
  client's SPIFFE ID - so only a workload holding the namespace's private key (the Secret mounted
  only into sidecars of that namespace) can announce it, and a replayed announcement from another
  client fails;
* a JWK carrying private material (``d``) is refused and nothing of it is stored; only ``kty``,
  ``crv``, ``x``, ``y``, ``kid``, ``alg`` and ``use`` are kept;
* ``retired`` keys (no longer signing, their tokens still valid) can only be announced when already
  known: a retirement can shorten nothing and add nothing new.

The residual risk is a compromised sidecar *of namespace A*: it could announce a key it made for A.
It already holds A's signing key, so it could already mint A's tokens; the announcement is recorded
(who, when) and an operator sees it in the JWKS and the records.

**Persisting.** One ConfigMap, ``<namespace>.json`` per namespace: ``{"keys": {kid: {"jwk", "role",
"active_until", "retired_until", "announced_by", "announced_at"}}}``; written only when something
changes (a new key, a role, a retirement, or ``active_until`` moving by more than a tenth of
``keys.announce_ttl``), through the same conflict-safe document as the revocations, and watched by
every replica.

**Publishing.** The JWKS of a namespace lists its keys still published - current first, then next,
then retired (RFC 7517 §5); a key announced as current or next stays ``announce_ttl`` after its last
announcement, a retired one until its ``until``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.authority.documents import ConfigMapDocument
from sidecar.authority.kube import KubeClient
from sidecar.authority.protocol import (
    DISCOVERY_SUFFIX,
    JWKS_SUFFIX,
    AuthorityCode,
    AuthorityError,
    issuer_for,
    public_key_of,
    verify_key_proof,
)
from sidecar.tokens.keys import thumbprint

__all__ = ["Announcement", "KeyRegistry", "discovery_document", "parse_announcement"]

_log = structlog.get_logger("agent_authz.authority.keys")
_PUBLIC_FIELDS = ("kty", "crv", "x", "y", "kid", "alg", "use")
_ROLES = {"current": 0, "next": 1, "retired": 2}
_MAX_KEYS = 32
_MAX_RETIRED_FOR = 86400 * 2


@dataclass(frozen=True, slots=True)
class Announcement:
    """A parsed ``POST /v1/keys`` body: ``(jwk, role, proof)`` per signing key, ``(kid, until)`` per retired one."""

    keys: tuple[tuple[dict[str, Any], str, str], ...]
    retired: tuple[tuple[str, int], ...]


def parse_announcement(body: Any) -> Announcement:
    """Parse ``{"keys": [{"jwk", "role", "proof"}], "retired": [{"kid", "until"}]}``.

    Raises:
        AuthorityError: ``bad_request`` naming what is wrong.
    """
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list) or not body["keys"]:
        raise AuthorityError(AuthorityCode.BAD_REQUEST, 'expected {"keys": [{"jwk", "role", "proof"}, ...]}')
    keys = []
    for item in body["keys"][:4]:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("jwk"), dict)
            or not isinstance(item.get("proof"), str)
        ):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, "each key needs a jwk object and a proof string")
        role = item.get("role")
        if role not in ("current", "next"):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, "role must be current or next")
        keys.append((dict(item["jwk"]), str(role), item["proof"]))
    retired = []
    for item in body.get("retired", [])[:16] if isinstance(body.get("retired"), list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("kid"), str) or not isinstance(item.get("until"), int):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, "each retired key needs a kid and an integer until")
        retired.append((item["kid"], int(item["until"])))
    return Announcement(tuple(keys), tuple(retired))


def discovery_document(issuer: str, algorithms: Sequence[str]) -> dict[str, Any]:
    """The OpenID discovery metadata a token verifier reads (OpenID Connect Discovery 1.0 §3; the
    fields the Kubernetes ServiceAccount issuer publishes too): ``issuer``, ``jwks_uri``, and the
    REQUIRED ``response_types_supported``, ``subject_types_supported``,
    ``id_token_signing_alg_values_supported``."""
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_SUFFIX,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(algorithms) or ["ES256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act", "client_id", "scope", "txn"],
    }


def _public(jwk: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jwk[k] for k in _PUBLIC_FIELDS if k in jwk}


class KeyRegistry:
    """Announced keys of every namespace, in a ConfigMap kept current by a watch.

    Args:
        client: the Kubernetes API client.
        configmap: the keys ConfigMap's name.
        base_url: the issuers' base URL (``<base>/ns/<namespace>``).
        namespaces: the namespaces served.
        announce_ttl: seconds a current or next key stays published after its last announcement.
        max_retries / watch_timeout: as for :class:`~sidecar.authority.documents.ConfigMapDocument`.
        clock: POSIX seconds.

    Attributes:
        document: the ConfigMap document.
        keys: namespace -> kid -> record, of the latest version.
    """

    def __init__(
        self,
        client: KubeClient,
        configmap: str,
        *,
        base_url: str,
        namespaces: Sequence[str],
        announce_ttl: float = 3600.0,
        max_retries: int = 20,
        watch_timeout: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url
        self.namespaces = frozenset(namespaces)
        self.keys: dict[str, dict[str, dict[str, Any]]] = {}
        self._ttl = announce_ttl
        self._clock = clock
        self._jwks_cache: dict[str, tuple[float, bytes, str]] = {}
        self.document = ConfigMapDocument(
            client, configmap, on_change=self._changed, max_retries=max_retries, watch_timeout=watch_timeout
        )

    def issuer(self, namespace: str) -> str:
        """The issuer URL of ``namespace``."""
        return issuer_for(self.base_url, namespace)

    def _changed(self, data: Mapping[str, str], _: str) -> None:
        keys: dict[str, dict[str, dict[str, Any]]] = {}
        for name, text in data.items():
            namespace = name.removesuffix(".json")
            if not name.endswith(".json") or namespace not in self.namespaces:
                continue
            try:
                document = json.loads(text)
                records = document["keys"]
                if not isinstance(records, dict):
                    raise TypeError("keys must be an object")
                keys[namespace] = {str(kid): dict(r) for kid, r in records.items() if isinstance(r, dict)}
            except (ValueError, KeyError, TypeError) as exc:
                _log.error("keys_unreadable", namespace=namespace, error=str(exc))
                keys[namespace] = self.keys.get(namespace, {})
        self.keys = keys
        self._jwks_cache.clear()

    # -- announcing -------------------------------------------------------------------------------
    async def announce(self, announcement: Announcement, *, namespace: str, peer: str) -> list[str]:
        """Accept an announcement from ``peer`` (an SVID of ``namespace``); returns the kids now published.

        Raises:
            AuthorityError: ``unknown_namespace``, ``key_private``, ``key_proof_invalid`` (nothing is
                stored then), ``bad_request`` (too many keys).
            KubeApiError: the ConfigMap could not be written.
        """
        if namespace not in self.namespaces:
            raise AuthorityError(
                AuthorityCode.UNKNOWN_NAMESPACE, f"no signing-key scope for namespace {namespace!r}", 403
            )
        now = self._clock()
        issuer = self.issuer(namespace)
        proven: list[tuple[dict[str, Any], str]] = []
        for jwk, role, proof in announcement.keys:
            public_key_of(jwk)  # refuses private material and other key types first
            verify_key_proof(proof, jwk, issuer=issuer, subject=peer, now=now)
            public = _public(jwk)
            public["kid"] = thumbprint(jwk)
            public.setdefault("use", "sig")
            public.setdefault("alg", "ES256" if jwk.get("kty") == "EC" else "EdDSA")
            proven.append((public, role))
        refresh = self._ttl / 10

        def merge(data: dict[str, str]) -> dict[str, str] | None:
            name = f"{namespace}.json"
            try:
                records = json.loads(data[name])["keys"] if name in data else {}
            except (ValueError, KeyError, TypeError):
                records = {}
            before = json.dumps(records, sort_keys=True)
            for public, role in proven:
                record = records.setdefault(
                    public["kid"], {"jwk": public, "retired_until": 0, "active_until": 0, "announced_at": 0}
                )
                stale = now + self._ttl - record.get("active_until", 0) > refresh
                if stale or record.get("role") != role or record.get("jwk") != public:
                    record.update(
                        jwk=public,
                        role=role,
                        announced_by=peer,
                        active_until=int(now + self._ttl),
                        announced_at=int(now),
                    )
            active = {public["kid"] for public, _ in proven}
            for kid, announced_until in announcement.retired:
                record = records.get(kid)
                if record is None or kid in active:
                    continue  # only a key proven before can be announced as retired
                until = min(announced_until, int(now + _MAX_RETIRED_FOR))
                if record.get("role") != "retired" or record.get("retired_until") != until:
                    record.update(
                        role="retired", retired_until=until, active_until=min(record["active_until"], int(now))
                    )
            records = {
                kid: r for kid, r in records.items() if max(r.get("active_until", 0), r.get("retired_until", 0)) > now
            }
            if len(records) > _MAX_KEYS:
                raise AuthorityError(AuthorityCode.BAD_REQUEST, f"more than {_MAX_KEYS} keys published for {namespace}")
            if json.dumps(records, sort_keys=True) == before:
                return None
            data[name] = json.dumps({"keys": records}, sort_keys=True, separators=(",", ":"))
            return data

        await self.document.update(merge)
        return [public["kid"] for public, _ in proven]

    # -- publishing -------------------------------------------------------------------------------
    def jwks(self, namespace: str) -> dict[str, list[dict[str, Any]]]:
        """The JWKS of ``namespace``: published keys, current first, then next, then retired.

        Raises:
            AuthorityError: ``unknown_namespace``.
        """
        if namespace not in self.namespaces:
            raise AuthorityError(AuthorityCode.UNKNOWN_NAMESPACE, f"no issuer for namespace {namespace!r}", 404)
        now = self._clock()
        records = [
            r
            for r in self.keys.get(namespace, {}).values()
            if max(r.get("active_until", 0), r.get("retired_until", 0)) > now and isinstance(r.get("jwk"), dict)
        ]
        records.sort(key=lambda r: (_ROLES.get(str(r.get("role")), 3), -int(r.get("announced_at", 0))))
        return {"keys": [_public(r["jwk"]) for r in records]}

    def jwks_body(self, namespace: str) -> tuple[bytes, str]:
        """The JWKS as bytes and its strong ETag (cached for a second: verifiers poll it)."""
        now = self._clock()
        cached = self._jwks_cache.get(namespace)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        body = json.dumps(self.jwks(namespace), separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self._jwks_cache[namespace] = (now + 1.0, body, etag)
        return body, etag

    def algorithms(self, namespace: str) -> list[str]:
        """The ``alg`` values of the namespace's published keys."""
        return sorted({str(k.get("alg", "ES256")) for k in self.jwks(namespace)["keys"]}) or ["ES256"]

    def discovery(self, namespace: str) -> dict[str, Any]:
        """The discovery document of ``namespace``'s issuer (see :func:`discovery_document`).

        Raises:
            AuthorityError: ``unknown_namespace``.
        """
        if namespace not in self.namespaces:
            raise AuthorityError(AuthorityCode.UNKNOWN_NAMESPACE, f"no issuer for namespace {namespace!r}", 404)
        return discovery_document(self.issuer(namespace), self.algorithms(namespace))

    @staticmethod
    def discovery_path(base_path: str, namespace: str) -> str:
        """The request path of a namespace's discovery document."""
        return f"{base_path.rstrip('/')}/ns/{namespace}{DISCOVERY_SUFFIX}"
