"""The bundle ``use`` rule (SPIFFE Trust Domain and Bundle §4.2.2; X509-SVID §6; JWT-SVID §6).

JWT-SVID authorities are the keys whose ``use`` is ``jwt-svid`` or absent (an allow-list); X.509
authorities the ``x509-svid`` ones; a key with any other ``use`` - the newer ``wit-svid`` workload
identity token keys, ``enc``, ``sig`` - or of a type no JWT-SVID algorithm uses is in neither set,
and is logged once. A JWT-SVID signed by such a key is refused (``jwt_svid_unknown_key``), whether
the bundle came from ``identity.files`` or from the Workload API.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.identity.bundles import log_ignored, parse_bundle_document
from sidecar.identity.devca import DevCA
from sidecar.identity.jwtsvid import JwtSvidVerifier
from sidecar.identity.workload_api import WorkloadApiIdentity
from sidecar.simulation.workload_api import WorkloadApiServer
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, load_files

AUDIENCE = "spiffe://test.example/ns/agents/sa/worker"

KEYS = {
    "jwt-1": ("ec-p256", "jwt-svid"),
    "plain-1": ("rsa-2048", None),  # a plain JWKS key: a JWT authority
    "wit-1": ("ec-p256", "wit-svid"),
    "enc-1": ("rsa-2048", "enc"),
    "sig-1": ("ec-p384", "sig"),
    "okp-1": ("ed25519", None),  # no JWT-SVID algorithm uses Ed25519
    "k256-1": ("ec-k256", "jwt-svid"),  # nor secp256k1
}
PRIVATE = {kid: fx.new_key(kind) for kid, (kind, _) in KEYS.items()}


def _document(trust_domain: str) -> bytes:
    ca = fx.make_ca(trust_domain)
    keys = [fx.public_jwk(PRIVATE[kid], kid=kid, use=use) for kid, (_, use) in KEYS.items()]
    return fx.document([fx.x509_jwk(ca.cert), *keys], spiffe_sequence=7, spiffe_refresh_hint=300)


def test_only_jwt_svid_and_use_less_keys_are_jwt_authorities() -> None:
    document = parse_bundle_document(_document("test.example"))
    assert set(document.jwt_authorities) == {"jwt-1", "plain-1"}
    assert len(document.x509_authorities) == 1
    assert (document.sequence, document.refresh_hint) == (7, 300)
    assert [line.split(":")[0] for line in document.ignored] == ["keys[3]", "keys[4]", "keys[5]", "keys[6]", "keys[7]"]
    assert "use 'wit-svid' (kid 'wit-1')" in document.ignored[0]


def _token(kid: str, sub: str) -> str:
    alg = {"ec-p256": "ES256", "ec-p384": "ES384", "rsa-2048": "RS256"}[KEYS[kid][0]]
    return fx.jws({"alg": alg, "kid": kid, "typ": "JWT"}, fx.claims(sub, [AUDIENCE]), PRIVATE[kid])


VERDICTS: list[tuple[str, str | None]] = [
    ("jwt-1", None),
    ("plain-1", None),
    ("wit-1", "jwt_svid_unknown_key"),
    ("enc-1", "jwt_svid_unknown_key"),
    ("sig-1", "jwt_svid_unknown_key"),
]


@pytest.mark.parametrize(("kid", "detail"), VERDICTS, ids=[k for k, _ in VERDICTS])
def test_files_jwt_bundle_follows_the_use_rule(tmp_path: Path, kid: str, detail: str | None) -> None:
    root = fx.make_ca("test.example")
    cert, key = fx.make_leaf(root, [AUDIENCE])
    fx.write(tmp_path / "svid.pem", fx.pem(cert))
    fx.write(tmp_path / "svid.key", fx.key_pem(key))
    fx.write(tmp_path / "bundle.pem", root.pem)
    fx.write(tmp_path / "jwt.json", _document("test.example"))
    state = load_files(tmp_path, bundles={"test.example": "bundle.pem"}, jwt_bundles={"test.example": "jwt.json"})
    verifier = JwtSvidVerifier(state.bundles, [AUDIENCE])
    token = _token(kid, "spiffe://test.example/caller")
    expect(lambda: verifier.verify(token, now=time.time()), detail)


def test_ignored_keys_are_logged_once() -> None:
    trust_domain = f"t{uuid.uuid4().hex[:8]}.example"
    document = parse_bundle_document(_document(trust_domain))
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            log_ignored(trust_domain, document, source="identity.files.jwt_bundles." + trust_domain)
            log_ignored(trust_domain, parse_bundle_document(_document(trust_domain)), source="workload_api")
    events = [e for e in logs if e["event"] == "bundle_keys_ignored"]
    assert len(events) == 1 and events[0]["trust_domain"] == trust_domain and len(events[0]["keys"]) == 5
    assert events[0]["log_level"] == "warning"


@pytest.mark.e2e
def test_workload_api_jwt_bundles_follow_the_use_rule(short_dir: Path) -> None:
    ca = DevCA.create("test.example")
    server = WorkloadApiServer(short_dir / "agent.sock", ca, AUDIENCE)
    server.jwt_documents = {"test.example": _document("test.example")}
    server.start()
    identity: Any = None
    try:
        identity = WorkloadApiIdentity(server.address, timeout=10, with_jwt=True)
        assert set(identity.state.bundles.jwt["test.example"]) == {"jwt-1", "plain-1"}
        verifier = JwtSvidVerifier(identity.state.bundles, [AUDIENCE])
        for kid, detail in VERDICTS:
            expect(
                lambda kid=kid: verifier.verify(_token(kid, "spiffe://test.example/caller"), now=time.time()), detail
            )
    finally:
        if identity is not None:
            identity.close()
        server.stop()


# -- the document rules around the use rule (Trust Domain and Bundle §4.1, §4.2) -----------------------
def test_unknown_members_are_tolerated() -> None:
    jwk = fx.public_jwk(PRIVATE["jwt-1"], kid="jwt-1", use="jwt-svid", alg="ES256", x_vendor={"rotated": True})
    data = fx.document([jwk], spiffe_sequence=2**64 - 1, x_operator="example", spiffe_refresh_hint=0)
    document = parse_bundle_document(data)
    assert set(document.jwt_authorities) == {"jwt-1"} and document.sequence == 2**64 - 1


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (lambda d: d.update(keys={"jwt-1": {}}), "bundle_malformed"),
        (lambda d: d.update(spiffe_sequence=-1), "bundle_malformed"),
        (lambda d: d.update(spiffe_sequence=2**64), "bundle_malformed"),
        (lambda d: d.update(spiffe_refresh_hint="60"), "bundle_malformed"),
        (lambda d: d["keys"].append("not a JWK"), "bundle_malformed"),
        (lambda d: d["keys"][0].update(d="c2VjcmV0"), "bundle_bad_key"),  # private key material
        (lambda d: d["keys"][0].update(use=["jwt-svid"]), "bundle_bad_key"),
        (lambda d: d["keys"][0].pop("kty"), "bundle_bad_key"),
        (lambda d: d["keys"][0].update(kid=7), "bundle_bad_key"),
        (lambda d: d["keys"][1].update(x5c=[]), "bundle_bad_x509_entry"),
        (lambda d: d["keys"][1].pop("x5c"), "bundle_bad_x509_entry"),
        (lambda d: d["keys"][1].update(x5c=["bm90IERFUg=="]), "bundle_bad_x509_entry"),
    ],
    ids=[
        "keys-not-an-array",
        "negative-sequence",
        "sequence-over-64-bits",
        "string-refresh-hint",
        "a-key-that-is-not-an-object",
        "private-key-material",
        "use-not-a-string",
        "no-kty",
        "kid-not-a-string",
        "empty-x5c",
        "no-x5c",
        "x5c-not-a-certificate",
    ],
)
def test_a_broken_document_is_refused_whole(mutate: Any, detail: str) -> None:
    ca = fx.make_ca("test.example")
    body = {"keys": [fx.public_jwk(PRIVATE["jwt-1"], kid="jwt-1", use="jwt-svid"), fx.x509_jwk(ca.cert)]}
    mutate(body)
    expect(lambda: parse_bundle_document(json.dumps(body).encode()), detail)
