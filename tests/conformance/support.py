"""Helpers shared by the conformance suite: run a case, compare with the upstream expectation, name it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.config.loader import read_secret_file
from sidecar.config.schema import IdentityFilesSpec
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
    spec = IdentityFilesSpec(
        svid=root / svid,
        key=root / key,
        bundles={td: root / name for td, name in bundles.items()},
        jwt_bundles={td: root / name for td, name in (jwt_bundles or {}).items()},
    )

    def read(path: Path, field: str) -> bytes:
        return read_secret_file(path, file=str(root / "sidecar.yaml"), field=field)

    return load_identity_files(spec, read, file=str(root / "sidecar.yaml"), now=now or time.time())


def go(package: str, test: str, case: str | None = None) -> str:
    """A test id naming the go-spiffe case: ``go-spiffe/<package>/<Test>/<subtest>`` (Go's own subtest
    names: spaces become underscores, as ``go test -run`` shows them)."""
    return f"go-spiffe/{package}/{test}" + (f"/{case.replace(' ', '_')}" if case else "")


def py(module: str, test: str, index: Any = None) -> str:
    """A test id naming the py-spiffe case: ``py-spiffe/<module>/<test>[<param index>]``."""
    return f"py-spiffe/{module}/{test}" + (f"[{index}]" if index is not None else "")
