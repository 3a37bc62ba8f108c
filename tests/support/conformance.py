"""Helpers shared by the SPIFFE conformance suite (tests/conformance): run a case, compare with the
upstream expectation, name it; and the table of cases where we differ from the upstream."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.config.loader import read_secret_file
from sidecar.errors import IdentityError
from sidecar.identity.bundles import BundleError
from sidecar.identity.local_svid import LocalIdentityError
from sidecar.identity.state import IdentityLoadError, IdentityState, load_identity_files

T = TypeVar("T")
IDENTITY_ERRORS = (IdentityError, LocalIdentityError, BundleError, IdentityLoadError)


def expect(run: Callable[[], T], detail: str | None) -> T | None:
    """Run a case: ``detail=None`` means the upstream accepts it (so must we); otherwise the upstream
    rejects it and we must reject it with exactly this sub-code - and with no other exception type."""
    if detail is None:
        return run()
    with pytest.raises(IDENTITY_ERRORS) as info:
        run()
    assert info.value.detail == detail, f"expected {detail}, got {info.value}"
    return None


def load_files(
    root: Path,
    *,
    svid: str = "svid.pem",
    key: str = "svid.key",
    bundles: Mapping[str, str],
    jwt_bundles: Mapping[str, str] | None = None,
    now: float | None = None,
) -> IdentityState:
    """``identity.files`` exactly as the runtime loads it (same reader: missing, empty, size limit)."""

    def read(path: Path, field: str) -> bytes:
        return read_secret_file(path, file=str(root / "sidecar.yaml"), field=field)

    return load_identity_files(
        read,
        svid=root / svid,
        key=root / key,
        bundles={td: root / name for td, name in bundles.items()},
        jwt_bundles={td: root / name for td, name in (jwt_bundles or {}).items()},
        file=str(root / "sidecar.yaml"),
        now=now or time.time(),
    )


def go(package: str, test: str, case: str | None = None) -> str:
    """A test id naming the go-spiffe case: ``go-spiffe/<package>/<Test>/<subtest>`` (Go's own subtest
    names: spaces become underscores, as ``go test -run`` shows them)."""
    return f"go-spiffe/{package}/{test}" + (f"/{case.replace(' ', '_')}" if case else "")


def py(module: str, test: str, index: Any = None) -> str:
    """A test id naming the py-spiffe case: ``py-spiffe/<module>/<test>[<param index>]``."""
    return f"py-spiffe/{module}/{test}" + (f"[{index}]" if index is not None else "")


DIFFERENT = {
    go("x509bundle", "TestParse", "Parse empty bytes should result in empty bundle"): (
        "an empty PEM file is refused (bundle_empty): it cannot be told from a truncated write; a trust domain "
        "that revoked every key publishes a SPIFFE bundle with keys: [] (accepted, empty)"
    ),
    py("jwt_bundle/test_jwt_bundle", "test_parse_jwks_with_null_keys_field"): (
        '{"keys": null} is refused (bundle_missing_keys): RFC 7517 §5 and Trust Domain and Bundle §4.1.3 require '
        "the keys member; go-spiffe's spiffebundle refuses it too"
    ),
    py("jwtsvid/test_jwt_svid", "test_parse_and_validate_valid_token_RSA", "sub=spiffe://test.com"): (
        "a JWT-SVID subject without a path (the trust domain's own ID) is refused (jwt_svid_invalid_subject): "
        "it names no workload (JWT-SVID §3.1, X509-SVID §3.1 for the same rule on leaves)"
    ),
    py("jwtsvid/test_jwt_svid", "test_parse_and_validate_valid_token_future_iat"): (
        "iat an hour ahead is refused (jwt_svid_issued_in_future): a token issued later than now plus the leeway "
        "(ingress.jwt_svid_leeway, 30 s) comes from a clock far off or is forged (RFC 7519 §4.1.6)"
    ),
    py("jwtsvid/test_jwt_svid_validator", "test_validate_claims_invalid_aud", 3): (
        "aud ['something'] with expected {'something', 'matters'} is accepted: one accepted audience in aud is "
        "enough (go-spiffe's AnyAudience; JWT-SVID §3.2), py-spiffe requires every expected one"
    ),
    py("jwtsvid/test_jwt_svid_validator", "test_validate_claims_token_expired", 0): (
        "exp given as the string '1611075778' is refused as jwt_svid_malformed, not as expired: a NumericDate is a "
        "JSON number (RFC 7519 §2)"
    ),
    py("jwtsvid/test_jwt_svid_validator", "test_validate_header_valid_headers", 2): (
        "typ '' is refused (jwt_svid_bad_header): JWT-SVID §2.3 allows only JWT or JOSE when typ is set; go-spiffe "
        "refuses it too"
    ),
}
"""The upstream cases whose expectation we do not share (test id -> why); each is in the differences
table of docs/concepts/identity-conformance.md, and its test asserts our answer."""
