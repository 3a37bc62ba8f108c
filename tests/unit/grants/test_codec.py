"""Grant JWS verification at the PyJWT boundary: a key of the wrong type is a bad signature, never a TypeError.

A grant names its signer with ``kid`` (a root issuer key) or ``x5c`` (an X.509-SVID leaf); both are
chosen by whoever wrote the grant, so the key they name may be of another type or curve than the
header's ``alg`` needs. PyJWT answers some of those pairs with a bare ``TypeError`` ("Expecting a
PEM-formatted key."), others with ``InvalidKeyError``: each must end as ``grant_bad_signature``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from sidecar.grants import codec
from sidecar.grants.model import GRANT_TYP, GrantCode, GrantError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.devca import DevCA
from sidecar.identity.x509svid import X509SvidVerifier
from tests.support.certs import key_usage

KEYS: dict[str, PrivateKeyTypes] = {
    "ec-p256": ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": ec.generate_private_key(ec.SECP384R1()),
    "rsa": rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
PAIRS = list(itertools.product(KEYS, KEYS))


def _verify(token: str, **kwargs: object) -> tuple[str, dict[str, object]]:
    return codec.verify(token, typ=GRANT_TYP, now=time.time(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("signed_with", "kid_names"), PAIRS, ids=[f"{a}-kid-names-{b}" for a, b in PAIRS])
def test_a_kid_naming_a_key_of_another_type_is_a_bad_signature(signed_with: str, kid_names: str) -> None:
    token = codec.sign({"jti": "g1"}, KEYS[signed_with], typ=GRANT_TYP, kid="root")
    root_keys = {"root": KEYS[kid_names].public_key()}
    if signed_with == kid_names:
        assert _verify(token, root_keys=root_keys, svids=None) == ("key:root", {"jti": "g1"})
        return
    with pytest.raises(GrantError) as info:
        _verify(token, root_keys=root_keys, svids=None)
    assert info.value.detail is GrantCode.BAD_SIGNATURE, info.value


def _leaf(ca: DevCA, public_key: object) -> x509.Certificate:
    """A valid X.509-SVID leaf for ``public_key`` (of any type), signed by ``ca``."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "grant signer")]))
        .issuer_name(ca.ca_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://test.example/ns/o/sa/planner")]),
            critical=False,
        )
        .sign(ca.ca_key, hashes.SHA256())
    )


@pytest.mark.parametrize(("signed_with", "leaf_key"), PAIRS, ids=[f"{a}-x5c-leaf-{b}" for a, b in PAIRS])
def test_an_x5c_leaf_with_a_key_of_another_type_is_a_bad_signature(signed_with: str, leaf_key: str) -> None:
    ca = DevCA.create("test.example")
    svids = X509SvidVerifier(TrustBundles({"test.example": (ca.ca_cert,)}))
    leaf = _leaf(ca, KEYS[leaf_key].public_key())
    token = codec.sign({"jti": "g1"}, KEYS[signed_with], typ=GRANT_TYP, x5c=[leaf])
    if signed_with == leaf_key:
        assert _verify(token, root_keys={}, svids=svids) == ("spiffe://test.example/ns/o/sa/planner", {"jti": "g1"})
        return
    with pytest.raises(GrantError) as info:
        _verify(token, root_keys={}, svids=svids)
    assert info.value.detail is GrantCode.BAD_SIGNATURE, info.value
