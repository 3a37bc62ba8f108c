"""py-spiffe ``spiffe/tests/unit/svid/x509svid/test_x509_svid.py``.

``X509Svid.parse`` / ``parse_raw`` / ``load`` are the local identity here (PEM files, the Workload
API's DER); the cases built with mocks (a certificate object whose extension lookup raises) are
rebuilt as real certificates lacking that extension. ``save``, encoding options and constructor
cases are API details (docs/identity-conformance.md), except the private key file mode, which our
own SVID writer (``agent-authz dev-ca``) must get right too.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import SvidDetail
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.devca import DevCA
from sidecar.identity.local_svid import parse_svid_der, parse_svid_pem, validate_local_svid
from sidecar.identity.state import IdentityLoadError
from tests.support import spiffe_testdata as fx
from tests.support.conformance import expect, load_files, py

M = "x509svid/test_x509_svid"
TD = "example.org"
SERVICE = f"spiffe://{TD}/service"


@dataclass
class World:
    root: fx.Authority
    intermediate: fx.Authority
    bundles: TrustBundles


@pytest.fixture(scope="module")
def world() -> World:
    root = fx.make_ca(TD)
    return World(root, fx.make_ca(TD, signer=root), TrustBundles({TD: (root.cert,)}))


def _chain(world: World, **leaf: Any) -> tuple[list[Any], Any]:
    """``2-chain.pem`` / ``1-chain.der``: a leaf for ``spiffe://example.org/service`` and its intermediate."""
    cert, key = fx.make_leaf(world.intermediate, leaf.pop("uris", [SERVICE]), **leaf)
    return [cert, world.intermediate.cert], key


def _validate(world: World, chain: list[Any], key: Any) -> Any:
    return validate_local_svid(chain, key, world.bundles, now=time.time())


def _pem_case(world: World, certs: bytes, key: bytes) -> Any:
    chain, private = parse_svid_pem(certs, key)
    return _validate(world, chain, private)


def _der_case(world: World, certs: bytes, key: bytes) -> Any:
    chain, private = parse_svid_der(certs, key)
    return _validate(world, chain, private)


@pytest.mark.parametrize(
    ("encoding", "rsa"),
    [
        pytest.param("der", False, id=py(M, "test_parse_raw_chain_and_ec_key")),
        pytest.param("pem", False, id=py(M, "test_parse_chain_and_ec_key")),
        pytest.param("pem", True, id=py(M, "test_parse_leaf_only_and_rsa_key")),
    ],
)
def test_parse_good(world: World, encoding: str, rsa: bool) -> None:
    if rsa:  # 3-good-leaf-only.pem + 3-key-pkcs8-rsa.pem: a leaf signed by the root, no intermediate
        cert, key = fx.make_leaf(world.root, [f"spiffe://{TD}/workload-1"], key=fx.cached_key("rsa-2048"))
        chain = [cert]
    else:
        chain, key = _chain(world)
    svid = (
        _der_case(world, fx.der(*chain), fx.key_der(key))
        if encoding == "der"
        else _pem_case(world, fx.pem(*chain), fx.key_pem(key, traditional=True))
    )
    assert svid.spiffe_id == (f"spiffe://{TD}/workload-1" if rsa else SERVICE) and len(svid.chain) == len(chain)
    assert svid.private_key.public_key() == chain[0].public_key()


BAD_INPUTS = [
    # (py-spiffe test, encoding, certificate bytes, key bytes, sub-code)
    ("test_parse_raw_missing_certificate", "der", "key", "key", "svid_malformed"),
    ("test_parse_missing_certificate", "pem", "key", "key", "svid_malformed"),
    ("test_parse_raw_missing_key", "der", "chain", "chain", SvidDetail.SVID_BAD_PRIVATE_KEY),
    ("test_parse_missing_key", "pem", "chain", "chain", SvidDetail.SVID_BAD_PRIVATE_KEY),
    ("test_parse_raw_corrupted_certificate", "der", "corrupted", "key", "svid_malformed"),
    ("test_parse_corrupted_certificate", "pem", "corrupted", "key", "svid_malformed"),
    ("test_parse_raw_corrupted_private_key", "der", "chain", "corrupted", SvidDetail.SVID_BAD_PRIVATE_KEY),
    ("test_parse_corrupted_private_key", "pem", "chain", "corrupted", SvidDetail.SVID_BAD_PRIVATE_KEY),
]


@pytest.mark.parametrize(
    ("encoding", "certs", "key", "detail"), [pytest.param(*case[1:], id=py(M, case[0])) for case in BAD_INPUTS]
)
def test_parse_bad_input(world: World, encoding: str, certs: str, key: str, detail: str) -> None:
    chain, private = _chain(world)
    corrupted = b"\x30\x82\xff\xff corrupted bytes"  # py-spiffe's ``corrupted`` file: neither PEM nor DER
    if encoding == "der":
        material = {"chain": fx.der(*chain), "key": fx.key_der(private), "corrupted": corrupted}
        expect(lambda: _der_case(world, material[certs], material[key]), detail)
    else:
        material = {"chain": fx.pem(*chain), "key": fx.key_pem(private), "corrupted": corrupted}
        expect(lambda: _pem_case(world, material[certs], material[key]), detail)


RULES = [
    # (py-spiffe test, how the leaf / signer is broken, sub-code)
    ("test_parse_invalid_spiffe_id", {"uris": []}, "svid_no_uri_san"),
    ("test_parse_leaf_ca_true", {"ca": True}, "svid_leaf_is_ca"),
    ("test_parse_no_digital_signature", {"usage": fx.key_usage(key_agreement=True)}, "svid_bad_key_usage"),
    (
        "test_parse_key_cert_sign",
        {"usage": fx.key_usage(digital_signature=True, key_cert_sign=True)},
        "svid_bad_key_usage",
    ),
    ("test_parse_crl_sign", {"usage": fx.key_usage(digital_signature=True, crl_sign=True)}, "svid_bad_key_usage"),
    ("test_extract_spiffe_id_missing_san_extension", {"uris": []}, "svid_no_uri_san"),
    (
        "test_validate_leaf_missing_basic_constraints_extension",
        {"basic_constraints": False},
        SvidDetail.SVID_NO_BASIC_CONSTRAINTS,
    ),
    ("test_validate_leaf_missing_key_usage_extension", {"usage": False}, "svid_bad_key_usage"),
    (
        "test_extract_spiffe_id_rejects_multiple_uri_sans",
        {"uris": [SERVICE, "https://example.org/"]},
        "svid_multiple_uri_sans",
    ),
    (
        "test_extract_spiffe_id_rejects_single_uri_san_non_spiffe",
        {"uris": ["https://example.org/"]},
        "svid_invalid_spiffe_id",
    ),
    (
        "test_extract_spiffe_id_allows_dns_sans_with_single_spiffe_uri_san",
        {"dns": ["example.org", "workload.example.org"]},
        None,
    ),
    ("test_parse_rejects_root_path_spiffe_id_in_leaf", {"uris": [f"spiffe://{TD}"]}, "svid_invalid_spiffe_id"),
    (
        "test_parse_rejects_multiple_uri_sans_even_if_one_is_spiffe",
        {"uris": [SERVICE, "https://example.org/"]},
        "svid_multiple_uri_sans",
    ),
]


@pytest.mark.parametrize(("leaf", "detail"), [pytest.param(c[1], c[2], id=py(M, c[0])) for c in RULES])
def test_leaf_rules(world: World, leaf: dict[str, Any], detail: str | None) -> None:
    chain, key = _chain(world, **leaf)
    expect(lambda: _pem_case(world, fx.pem(*chain), fx.key_pem(key)), detail)


@pytest.mark.parametrize(
    "raw",
    [pytest.param(True, id=py(M, "test_parse_raw_rejects_root_path_spiffe_id_in_leaf"))],
)
def test_root_path_der(world: World, raw: bool) -> None:
    chain, key = _chain(world, uris=[f"spiffe://{TD}"])
    expect(lambda: _der_case(world, fx.der(*chain), fx.key_der(key)), "svid_invalid_spiffe_id")


SIGNERS = [
    ("test_parse_intermediate_no_ca", {"ca": False}, SvidDetail.SVID_SIGNER_NOT_CA),
    (
        "test_parse_intermediate_no_key_cert_sign",
        {"usage": fx.key_usage(crl_sign=True)},
        SvidDetail.SVID_SIGNER_BAD_KEY_USAGE,
    ),
    (
        "test_validate_intermediate_missing_basic_constraints_extension",
        {"basic_constraints": False},
        SvidDetail.SVID_SIGNER_NOT_CA,
    ),
    ("test_validate_intermediate_missing_key_usage_extension", {"usage": False}, SvidDetail.SVID_SIGNER_BAD_KEY_USAGE),
]


@pytest.mark.parametrize(("signer", "detail"), [pytest.param(c[1], c[2], id=py(M, c[0])) for c in SIGNERS])
def test_signer_rules(world: World, signer: dict[str, Any], detail: str) -> None:
    intermediate = fx.make_ca(TD, signer=world.root, **signer)
    cert, key = fx.make_leaf(intermediate, [SERVICE])
    expect(lambda: _pem_case(world, fx.pem(cert, intermediate.cert), fx.key_pem(key)), detail)


@pytest.mark.parametrize("_", [pytest.param(0, id=py(M, "test_create_x509_svid_no_cert_chain"))])
def test_no_cert_chain(world: World, _: int) -> None:
    expect(lambda: validate_local_svid([], fx.new_key(), world.bundles, now=time.time()), "svid_malformed")


@pytest.mark.parametrize("_", [pytest.param(0, id=py(M, "test_get_chain_returns_a_copy"))])
def test_chain_cannot_be_changed(world: World, _: int) -> None:
    chain, key = _chain(world)
    svid = _pem_case(world, fx.pem(*chain), fx.key_pem(key))
    assert isinstance(svid.chain, tuple) and list(svid.chain) == chain  # immutable: nothing to copy


LOADS = [
    # (py-spiffe test, what is wrong on disk, sub-code, field)
    ("test_load_from_pem_files", None, None, None),
    ("test_load_non_existent_cert_file", "no-cert", SvidDetail.IDENTITY_FILE_UNREADABLE, "identity.files.svid"),
    ("test_load_non_existent_key_bytes", "no-key", SvidDetail.IDENTITY_FILE_UNREADABLE, "identity.files.key"),
    (
        "test_load_cannot_read_key_bytes",
        "key-is-a-directory",
        SvidDetail.IDENTITY_FILE_UNREADABLE,
        "identity.files.key",
    ),
    ("test_load_rejects_root_path_spiffe_id_in_leaf", "root-path", "svid_invalid_spiffe_id", "identity.files.svid"),
]


@pytest.mark.parametrize(("fault", "detail", "field"), [pytest.param(*c[1:], id=py(M, c[0])) for c in LOADS])
def test_load(world: World, tmp_path: Path, fault: str | None, detail: str | None, field: str | None) -> None:
    chain, key = _chain(world, uris=[f"spiffe://{TD}"] if fault == "root-path" else [SERVICE])
    fx.write(tmp_path / "bundle.pem", world.root.pem)
    if fault != "no-cert":
        fx.write(tmp_path / "svid.pem", fx.pem(*chain))
    if fault == "key-is-a-directory":
        (tmp_path / "svid.key").mkdir()
    elif fault != "no-key":
        fx.write(tmp_path / "svid.key", fx.key_pem(key))
    if detail is None:
        state = load_files(tmp_path, bundles={TD: "bundle.pem"})
        assert state.svid.spiffe_id == SERVICE and len(state.svid.chain) == 2
        return
    with pytest.raises(IdentityLoadError) as info:
        load_files(tmp_path, bundles={TD: "bundle.pem"})
    assert (info.value.detail, info.value.field) == (detail, field)


@pytest.mark.parametrize(
    "existing",
    [
        pytest.param(False, id=py(M, "test_save_private_key_file_mode_is_restrictive")),
        pytest.param(True, id=py(M, "test_save_private_key_file_mode_is_restrictive_when_file_exists")),
    ],
)
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_key_is_private(tmp_path: Path, existing: bool) -> None:
    """Our SVID writer (``agent-authz dev-ca issue``, :meth:`DevCA.write_svid`) writes the key 0600."""
    if existing:
        fx.write(tmp_path / "workload.key", b"existing key")
        (tmp_path / "workload.key").chmod(0o644)
    issued = DevCA.create(TD).write_svid(f"spiffe://{TD}/workload", tmp_path, name="workload")
    assert issued.key == tmp_path / "workload.key"
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
