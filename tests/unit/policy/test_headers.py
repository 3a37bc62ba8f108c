"""Envoy's header limits as the sidecar computes them: the quick upper bound never lets through what
the exact count refuses."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy import headers as limits
from sidecar.wire import MAX_REQUEST_HEADERS_COUNT, MAX_REQUEST_HEADERS_KB

_NAMES = st.text("abcdefghijklmnopqrstuvwxyz-:", min_size=1, max_size=40)
_VALUES = st.text("ab,c", max_size=3000)


def _exact(headers: dict[str, str], to_set: list[tuple[str, str]], to_remove: list[str]) -> bool:
    """Envoy's sum (name plus value of every header kept, each comma a header of its own), spelled out."""
    setting = dict(to_set)
    gone = set(to_remove) | setting.keys()
    kept = {k: v for k, v in headers.items() if k not in gone}
    size = sum(len(k) + len(v) + v.count(",") * max(len(k) - 1, 0) for k, v in kept.items())
    size += sum(len(k) + len(v) for k, v in setting.items())
    count = sum(1 + v.count(",") for v in kept.values()) + len(setting)
    return size > MAX_REQUEST_HEADERS_KB * 1024 or count > MAX_REQUEST_HEADERS_COUNT


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(_NAMES, _VALUES, max_size=60),
    to_set=st.lists(st.tuples(_NAMES, st.text("xyz", max_size=8000)), max_size=3),
    removed=st.lists(_NAMES, max_size=3),
)
def test_over_envoy_limits_agrees_with_envoys_count(
    headers: dict[str, str], to_set: list[tuple[str, str]], removed: list[str]
) -> None:
    assert (limits.over_envoy_limits(headers, to_set, removed) is not None) is _exact(headers, to_set, removed)


def test_small_requests_fit_and_large_ones_do_not() -> None:
    assert limits.over_envoy_limits({":path": "/", "host": "a"}, [("authorization", "Bearer x")], []) is None
    big = {f"x-{i}": "v" * 1000 for i in range(70)}
    assert "bytes" in (limits.over_envoy_limits(big, [], []) or "")
    many = {"x-many": ",".join("v" * 150)}
    assert "headers" in (limits.over_envoy_limits(many, [], []) or "")
