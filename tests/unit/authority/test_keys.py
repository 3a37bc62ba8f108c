"""Public keys announced per namespace: proofs of possession, namespace binding, the JWKS and discovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.authority.keys import KeyRegistry, discovery_document, parse_announcement
from sidecar.authority.kube import KubeClient
from sidecar.authority.protocol import (
    AuthorityCode,
    AuthorityError,
    RevocationEntry,
    issuer_for,
    key_announcement,
    lists_from_entries,
    parse_entries,
    sign_key_proof,
    verify_key_proof,
)
from sidecar.simulation.kube_api import KubeApiDouble
from sidecar.tokens.keys import KeySet, RetiredKey, generate_private_key_pem, load_signing_key

BASE = "https://authority.authz.svc"
A, B = "spiffe://unit.example/ns/agents/sa/worker", "spiffe://unit.example/ns/research/sa/worker"
A2 = "spiffe://unit.example/ns/agents/sa/other"


def key(algorithm: str = "ES256") -> Any:
    return load_signing_key(generate_private_key_pem(algorithm), algorithm, file="t", field="k")  # type: ignore[arg-type]


def test_a_proof_verifies_only_for_its_key_issuer_subject_and_time() -> None:
    signing, now = key(), time.time()
    issuer = issuer_for(BASE, "agents")
    proof = sign_key_proof(signing, issuer=issuer, subject=A, role="current", now=now)
    assert verify_key_proof(proof, signing.public_jwk, issuer=issuer, subject=A, now=now)["kid"] == signing.kid
    other = key()
    cases: list[tuple[str, dict[str, Any], str, str, float]] = [
        (proof, other.public_jwk, issuer, A, now),  # another key
        (proof, signing.public_jwk, issuer_for(BASE, "research"), A, now),  # another namespace's issuer
        (proof, signing.public_jwk, issuer, B, now),  # replayed by another workload
        (proof, signing.public_jwk, issuer, A, now + 3600),  # stale
        (sign_key_proof(other, issuer=issuer, subject=A, role="current", now=now), signing.public_jwk, issuer, A, now),
        (jwt.encode({"iss": issuer}, "s" * 32, algorithm="HS256"), signing.public_jwk, issuer, A, now),
    ]
    for token, jwk, iss, subject, at in cases:
        with pytest.raises(AuthorityError) as refused:
            verify_key_proof(token, jwk, issuer=iss, subject=subject, now=at)
        assert refused.value.detail == AuthorityCode.KEY_PROOF_INVALID
    private = {**signing.public_jwk, "d": "c2VjcmV0"}
    with pytest.raises(AuthorityError) as leaked:
        verify_key_proof(proof, private, issuer=issuer, subject=A, now=now)
    assert leaked.value.detail == AuthorityCode.KEY_PRIVATE
    ed = key("EdDSA")
    ed_proof = sign_key_proof(ed, issuer=issuer, subject=A, role="next", now=now)
    assert verify_key_proof(ed_proof, ed.public_jwk, issuer=issuer, subject=A, now=now)["role"] == "next"


def test_entries_round_trip_and_group_per_signer() -> None:
    entries = parse_entries(
        [
            {"id": "q3", "signer": "key:k", "root": True, "revoked_at": 5},
            {"id": "q3/a", "signer": A, "root": False, "revoked_at": 6, "expires_at": 99},
            {"id": "q3/b", "signer": A, "root": False, "revoked_at": 7},
            {"id": "q3", "signer": "key:k", "root": True, "revoked_at": 5},
        ]
    )
    assert len(entries) == 3 and RevocationEntry.from_json(entries[1].to_json()) == entries[1]
    lists = {(r.signer, r.root): (r.ids, r.issued_at) for r in lists_from_entries(entries)}
    assert lists == {("key:k", True): (frozenset({"q3"}), 5), (A, False): (frozenset({"q3/a", "q3/b"}), 7)}
    for bad in (
        {"id": "", "signer": "s", "root": True, "revoked_at": 1},
        {"id": "x", "signer": "s", "root": 1, "revoked_at": 1},
    ):
        with pytest.raises(ValueError):
            parse_entries([bad])


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[KeyRegistry, list[float]]]:
    double = KubeApiDouble(tmp_path / "kube")
    double.seed({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keys", "namespace": "authz"}})
    double.start()
    (tmp_path / "token").write_text(double.admin_token)
    clock = [time.time()]
    client = KubeClient(double.url, token_file=tmp_path / "token", ca_file=double.ca_file, namespace="authz")
    keys = KeyRegistry(
        client, "keys", base_url=BASE, namespaces=["agents", "research"], announce_ttl=600, clock=lambda: clock[0]
    )
    yield keys, clock
    double.stop()


def test_announced_keys_are_published_for_the_announcers_namespace_only(
    registry: tuple[KeyRegistry, list[float]],
) -> None:
    keys, clock = registry
    current, upcoming = key(), key()

    async def scenario() -> None:
        await keys.document.load()
        body = key_announcement(KeySet(current, upcoming), issuer=keys.issuer("agents"), subject=A, now=clock[0])
        assert await keys.announce(parse_announcement(body), namespace="agents", peer=A) == [current.kid, upcoming.kid]
        # research's workload replays the announcement: the proofs name another issuer and subject
        with pytest.raises(AuthorityError) as replayed:
            await keys.announce(parse_announcement(body), namespace="research", peer=B)
        assert replayed.value.detail == AuthorityCode.KEY_PROOF_INVALID
        with pytest.raises(AuthorityError) as unknown:
            await keys.announce(parse_announcement(body), namespace="kube-system", peer=A)
        assert unknown.value.detail == AuthorityCode.UNKNOWN_NAMESPACE
        await keys.document.client.aclose()

    asyncio.run(scenario())
    assert [k["kid"] for k in keys.jwks("agents")["keys"]] == [current.kid, upcoming.kid]
    assert keys.jwks("research") == {"keys": []}
    assert all(set(k) <= {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in keys.jwks("agents")["keys"])
    body, etag = keys.jwks_body("agents")
    assert etag.startswith('"') and keys.jwks_body("agents") == (body, etag)
    # verifiers need only issuer and jwks_uri; the REQUIRED discovery fields are there too
    assert keys.discovery("agents") == discovery_document(issuer_for(BASE, "agents"), ["ES256"])
    assert keys.discovery("agents")["jwks_uri"] == f"{BASE}/ns/agents/jwks.json"
    with pytest.raises(AuthorityError):
        keys.jwks("kube-system")


def test_rotation_keeps_the_retired_key_until_its_tokens_expire(registry: tuple[KeyRegistry, list[float]]) -> None:
    keys, clock = registry
    old, new = key(), key()

    async def scenario() -> None:
        await keys.document.load()
        issuer = keys.issuer("agents")
        await keys.announce(
            parse_announcement(key_announcement(KeySet(old), issuer=issuer, subject=A, now=clock[0])),
            namespace="agents",
            peer=A,
        )
        rotated = KeySet(new, retired=(RetiredKey(old.kid, old.public_jwk, clock[0] + 300),))
        await keys.announce(
            parse_announcement(key_announcement(rotated, issuer=issuer, subject=A, now=clock[0])),
            namespace="agents",
            peer=A,
        )
        # a retired kid nobody proved before is ignored (a retirement adds nothing)
        stranger = key()
        forged = key_announcement(
            KeySet(new, retired=(RetiredKey(stranger.kid, stranger.public_jwk, clock[0] + 300),)),
            issuer=issuer,
            subject=A,
            now=clock[0],
        )
        await keys.announce(parse_announcement(forged), namespace="agents", peer=A)
        await keys.document.client.aclose()

    asyncio.run(scenario())
    assert [k["kid"] for k in keys.jwks("agents")["keys"]] == [new.kid, old.kid]  # current first, then retired
    clock[0] += 301
    assert [k["kid"] for k in keys.jwks("agents")["keys"]] == [new.kid]
    clock[0] += 600
    assert keys.jwks("agents") == {"keys": []}  # not announced again for announce_ttl


def test_bad_announcement_bodies_are_bad_requests() -> None:
    for body in (None, {}, {"keys": []}, {"keys": [{"jwk": {}, "role": "boss", "proof": "x"}]}, {"keys": ["x"]}):
        with pytest.raises(AuthorityError) as bad:
            parse_announcement(body)
        assert bad.value.detail == AuthorityCode.BAD_REQUEST


def test_a_repeated_announcement_writes_only_when_the_publication_must_be_extended(
    registry: tuple[KeyRegistry, list[float]],
) -> None:
    keys, clock = registry
    current = key()

    async def scenario() -> list[int]:
        await keys.document.load()
        issuer = keys.issuer("agents")
        writes = []
        for step, peer in ((0, A), (30, A2), (25, A), (10, A)):  # a tenth of announce_ttl (600 s) is 60 s
            clock[0] += step
            body = key_announcement(KeySet(current), issuer=issuer, subject=peer, now=clock[0])
            await keys.announce(parse_announcement(body), namespace="agents", peer=peer)
            writes.append(keys.document.writes)
        await keys.document.client.aclose()
        return writes

    # the first announcement writes; another sidecar of the namespace 30 s later does not, nor one at
    # 55 s; at 65 s the publication would move by more than a tenth of announce_ttl: written again
    assert asyncio.run(scenario()) == [1, 1, 1, 2]
