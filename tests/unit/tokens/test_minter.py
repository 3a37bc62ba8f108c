"""The token minter on in-memory values: claims (RFC 9068, RFC 8693 act, txn, cnf), lifetime, cache, refresh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.tokens.keys import SigningKey, generate_private_key_pem, load_signing_key
from sidecar.tokens.minter import MintedToken, TokenCache, TokenMinter

NOW = 1_800_000_000.0
AGENT = "spiffe://td.example/ns/agents/sa/worker"
ISSUER = "https://issuer.example"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return load_signing_key(generate_private_key_pem("ES256"), "ES256", file="mem", field="key")


def minter(key: SigningKey, cache: TokenCache | None = None, **kw: Any) -> TokenMinter:
    options: dict[str, Any] = {"max_ttl": 300.0, "refresh_ahead": 0.25, "per_call": False, **kw}
    return TokenMinter(
        key,
        ISSUER,
        options.pop("max_ttl"),
        options.pop("refresh_ahead"),
        options.pop("per_call"),
        cache if cache is not None else TokenCache(),
        **options,
    )


def token(m: TokenMinter, now: float = NOW, **kw: Any) -> MintedToken:
    args: dict[str, Any] = {
        "task_id": "t1",
        "txn": "root",
        "task_fingerprint": "fp1",
        "task_expires_at": NOW + 3600,
        "subject": "user:jane@example.com",
        "actor": {"sub": AGENT, "act": {"sub": "spiffe://td.example/ns/orch/sa/planner"}},
        "client_id": AGENT,
        "audience": "https://api.example.com",
        "scope": "items:read",
        "now": now,
        **kw,
    }
    return m.token_for(**args)


def claims(key: SigningKey, minted: MintedToken) -> dict[str, Any]:
    header = jwt.get_unverified_header(minted.token)
    assert header == {"alg": "ES256", "kid": key.kid, "typ": "at+jwt"}
    return dict(
        jwt.decode(
            minted.token,
            key.private_key.public_key(),
            algorithms=["ES256"],
            audience="https://api.example.com",
            issuer=ISSUER,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    )


def test_claims_of_a_task_scoped_token(key: SigningKey) -> None:
    minted = token(minter(key), cnf="thumb")
    body = claims(key, minted)
    assert body["sub"] == "user:jane@example.com" and body["client_id"] == AGENT
    assert body["act"] == {"sub": AGENT, "act": {"sub": "spiffe://td.example/ns/orch/sa/planner"}}  # current outermost
    assert body["txn"] == "root" and body["scope"] == "items:read"
    assert body["cnf"] == {"x5t#S256": "thumb"}  # RFC 8705 §3.1
    assert body["iat"] == body["nbf"] == int(NOW) and body["exp"] == int(NOW) + 300
    assert all(isinstance(body[k], int) for k in ("iat", "nbf", "exp"))  # NumericDate (RFC 7519 §2)
    assert minted.info.jti == body["jti"] and minted.info.aud == "https://api.example.com" and not minted.info.cached


def test_no_scope_means_no_scope_claim(key: SigningKey) -> None:
    assert "scope" not in claims(key, token(minter(key), scope=None))


def test_a_token_never_outlives_its_task(key: SigningKey) -> None:
    minted = token(minter(key), task_expires_at=NOW + 42.9)
    assert minted.info.exp == int(NOW) + 42 == claims(key, minted)["exp"]


def test_cached_until_refresh_ahead_then_refreshed_behind_the_cache(key: SigningKey) -> None:
    cache = TokenCache()
    deferred: list[Callable[[], None]] = []
    clock = [NOW]
    m = minter(key, cache, max_ttl=100.0, defer=deferred.append, clock=lambda: clock[0])
    first = token(m)
    again = token(m, now=NOW + 10)
    assert again.token == first.token and again.info.cached and cache.hits == 1 and m.minted == 1
    late = token(m, now=NOW + 80)  # past refresh_at (75 s): still served from the cache ...
    assert late.token == first.token and len(deferred) == 1
    assert token(m, now=NOW + 81).token == first.token and len(deferred) == 1  # ... one refresh pending, not two
    clock[0] = NOW + 81
    deferred.pop()()  # the loop runs the refresh
    fresh = token(m, now=NOW + 82)
    assert fresh.token != first.token and fresh.info.cached and m.minted == 2 and cache.minted == 2


def test_expired_entries_are_minted_again_inline(key: SigningKey) -> None:
    m = minter(key, max_ttl=100.0, defer=lambda _: None)
    first = token(m)
    assert token(m, now=NOW + 99.5).token != first.token  # within a second of exp: never handed out


@pytest.mark.parametrize(
    "change",
    [{"audience": "https://other.example.com"}, {"scope": "items:write"}, {"task_fingerprint": "fp2"}, {"cnf": "t"}],
)
def test_the_cache_key_holds_everything_the_token_binds(key: SigningKey, change: dict[str, str]) -> None:
    m = minter(key)
    first = token(m)
    assert token(m, **change).token != first.token
    assert token(m).token == first.token


def test_per_call_minting_never_caches(key: SigningKey) -> None:
    cache = TokenCache()
    m = minter(key, cache, per_call=True)
    assert len({token(m).info.jti for _ in range(3)}) == 3 and len(cache) == 0


def test_retain_drops_tokens_of_tasks_gone_or_changed(key: SigningKey) -> None:
    cache = TokenCache()
    m = minter(key, cache)
    token(m)
    token(m, task_id="t2", task_fingerprint="fpx")
    cache.retain({("t2", "fpx")})
    assert len(cache) == 1
    assert token(m, task_id="t2", task_fingerprint="fpx").info.cached


# -- the size bound behind issuer.max_token_size --------------------------------------------------------
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


@settings(max_examples=80, deadline=None)
@given(
    subject=_TEXT.filter(bool),
    audience=_TEXT.filter(bool),
    scope=st.none() | _TEXT.filter(bool),
    txn=_TEXT.filter(bool),
    actors=st.lists(_TEXT.filter(bool), min_size=1, max_size=4),
    cnf=st.booleans(),
    now=st.floats(min_value=1_000_000_000, max_value=9_000_000_000),
    algorithm=st.sampled_from(["ES256", "EdDSA"]),
)
def test_no_minted_token_is_longer_than_its_bound(
    subject: str, audience: str, scope: str | None, txn: str, actors: list[str], cnf: bool, now: float, algorithm: str
) -> None:
    """Whatever the claims (non-ASCII escaped, nested act chains, any time): the bound holds, and is tight."""
    signing = load_signing_key(generate_private_key_pem(algorithm), algorithm, file="mem", field="key")  # type: ignore[arg-type]
    m = minter(signing, per_call=True)
    actor: dict[str, Any] = {"sub": actors[0]}
    for earlier in actors[1:]:
        actor = {"sub": earlier, "act": actor}
    claims = {"subject": subject, "actor": actor, "client_id": AGENT, "audience": audience, "scope": scope, "txn": txn}
    bound = m.size_bound(**claims, cnf=cnf)
    minted = m.token_for(
        task_id="t", task_fingerprint="f", task_expires_at=now + 300, now=now, cnf="c" * 43 if cnf else None, **claims
    )
    assert len(minted.token) <= bound <= len(minted.token) + 8
