"""docs/concepts/identity-conformance.md keeps up with the suite: every differing case and every new
sub-code is listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import BundleDetail, SvidDetail
from tests.support.conformance import DIFFERENT

DOC = (Path(__file__).resolve().parents[2] / "docs" / "concepts" / "identity-conformance.md").read_text()
ADDED = (
    SvidDetail.SVID_NO_BASIC_CONSTRAINTS,
    SvidDetail.SVID_SIGNER_NOT_CA,
    SvidDetail.SVID_SIGNER_BAD_KEY_USAGE,
    SvidDetail.SVID_BAD_PRIVATE_KEY,
    SvidDetail.SVID_KEY_MISMATCH,
    SvidDetail.SVID_SPIFFE_ID_CHANGED,
    SvidDetail.IDENTITY_FILE_UNREADABLE,
    *BundleDetail,
)
"""The sub-codes the conformance work added (the rest of :class:`SvidDetail` came before it)."""


@pytest.mark.parametrize("case", sorted(DIFFERENT))
def test_each_difference_is_in_the_table(case: str) -> None:
    assert f"`{case}`" in DOC


@pytest.mark.parametrize("code", ADDED)
def test_each_new_sub_code_is_documented(code: str) -> None:
    assert f"| `{code}` |" in DOC
