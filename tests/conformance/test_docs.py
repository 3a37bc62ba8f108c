"""docs/identity-conformance.md keeps up with the suite: every differing case and every new sub-code is listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.identity import codes
from tests.conformance import test_go_spiffe_bundles, test_py_spiffe_bundles, test_py_spiffe_jwtsvid

DOC = (Path(__file__).resolve().parents[2] / "docs" / "identity-conformance.md").read_text()
DIFFERENT = {
    **test_go_spiffe_bundles.DIFFERENT,
    **test_py_spiffe_bundles.DIFFERENT,
    **test_py_spiffe_jwtsvid.DIFFERENT,
}


@pytest.mark.parametrize("case", sorted(DIFFERENT))
def test_each_difference_is_in_the_table(case: str) -> None:
    assert f"`{case}`" in DOC


@pytest.mark.parametrize("name", codes.__all__)
def test_each_new_sub_code_is_documented(name: str) -> None:
    assert f"| `{getattr(codes, name)}` |" in DOC
