"""Strict SPIFFE ID parsing (SPIFFE-ID §2) on top of py-spiffe."""

from __future__ import annotations

import pytest

from sidecar.errors import SpiffeIdError
from sidecar.identity.spiffe_id import parse_spiffe_id


def test_valid_id_round_trips() -> None:
    parsed = parse_spiffe_id("spiffe://example.org/ns/agents/sa/reporter")
    assert str(parsed) == "spiffe://example.org/ns/agents/sa/reporter"
    assert str(parsed.trust_domain) == "example.org"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("SPIFFE://example.org/a", "lower case"),
        ("spiffe://Example.org/a", "lower case"),  # py-spiffe would silently lower-case this
        ("spiffe://example.org", "needs a path"),  # py-spiffe accepts a root ID
        ("spiffe://example.org/", "empty"),
        ("spiffe://example.org/a/../b", "'..'"),
        ("spiffe://example.org/a/./b", "'.'"),
        ("spiffe://example.org/a//b", "empty"),
        ("spiffe://example.org/%41", "invalid character"),
        ("spiffe://example.org/a?x=1", "invalid character"),
        ("spiffe://example.org/a#f", "invalid character"),
        ("spiffe://user@example.org/a", "disallowed"),
        ("spiffe://example.org:8080/a", "disallowed"),
        ("spiffe:///a", "trust domain"),
        ("https://example.org/a", "spiffe://"),
        ("spiffe://e.org/" + "a" * 2040, "2048 bytes"),
        ("spiffe://" + "a" * 256 + "/x", "255 bytes"),
    ],
)
def test_invalid_ids_are_rejected(value: str, why: str) -> None:
    with pytest.raises(SpiffeIdError, match=why):
        parse_spiffe_id(value)


def test_trust_domain_only_form_allowed_when_asked() -> None:
    assert str(parse_spiffe_id("spiffe://example.org", require_path=False)) == "spiffe://example.org"


def test_exact_length_limit() -> None:
    prefix = "spiffe://e.org/"
    ok = prefix + "a" * (2048 - len(prefix))
    assert str(parse_spiffe_id(ok)) == ok
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(ok + "a")
