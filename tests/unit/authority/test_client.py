"""The sidecar's feed client on its own: how events are applied, and a lagging replica's snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.authority.client import FeedClient, FeedError
from sidecar.authority.protocol import RevocationEntry
from sidecar.config.schema import RevocationFeedSpec


def _client() -> tuple[FeedClient, list[tuple[frozenset[str], bool]], list[float]]:
    applied: list[tuple[frozenset[str], bool]] = []
    clock = [1000.0]
    client = FeedClient(
        RevocationFeedSpec(url="https://authority.authz.svc:8444", ca=Path("ca.pem"), max_staleness=30),
        ca_file=Path("ca.pem"),
        svid=lambda: None,
        apply=lambda entries, snapshot: applied.append((frozenset(e.id for e in entries), snapshot)),
        clock=lambda: clock[0],
    )
    return client, applied, clock


def _event(revision: str, *ids: str, time: float = 999.5) -> str:
    entries = [RevocationEntry(i, "key:k", True, 1).to_json() for i in ids]
    return json.dumps({"revision": revision, "time": time, "entries": entries})


def test_events_are_applied_and_count_as_contact() -> None:
    client, applied, clock = _client()
    assert client.status.stale(1031.0)  # never connected: stale 30 s after start
    assert client.handle_event("snapshot", _event("10", "a"))
    assert client.status.connected and client.status.last_contact == 1000.0 and client.status.last_lag == 0.5
    clock[0] = 1010.0
    client.handle_event("revoked", _event("11", "b"))
    client.handle_event("heartbeat", json.dumps({"revision": "11", "time": 1010.0}))
    assert applied == [(frozenset({"a"}), True), (frozenset({"b"}), False)]
    assert client.status.events == {"snapshot": 1, "revoked": 1, "heartbeat": 1, "actions": 0}
    assert client.status.entries == 2
    assert not client.status.stale(1039.0) and client.status.stale(1040.5)
    with pytest.raises(FeedError):
        client.handle_event("revoked", "{not json")


def test_a_snapshot_older_than_what_was_applied_only_adds() -> None:
    """After a reconnect to a replica whose watch lags behind, its snapshot must not take back a
    revocation the sidecar already has from a newer revision."""
    client, applied, _ = _client()
    client.handle_event("snapshot", _event("20", "a", "b"))
    client.status.connected = False  # the stream was lost; the next one is to the lagging replica
    client.handle_event("snapshot", _event("18", "a"))
    client.handle_event("snapshot", _event("21", "a"))  # newer: b was taken back for real
    assert applied == [(frozenset({"a", "b"}), True), (frozenset({"a"}), False), (frozenset({"a"}), True)]


def test_the_last_contact_is_remembered_and_a_restart_counts_staleness_from_it() -> None:
    """A sidecar restarted while the feed is down gets no fresh grace period: staleness counts from
    the contact stored before the restart. What is stored is never later than the real contact:
    snapshots at once, other events at most every ``contact_interval`` seconds."""
    stored: list[float] = []
    clock = [1000.0]
    spec = RevocationFeedSpec(url="https://authority.authz.svc:8444", ca=Path("ca.pem"), max_staleness=30)

    def client(last: float | None) -> FeedClient:
        return FeedClient(
            spec,
            ca_file=Path("ca.pem"),
            svid=lambda: None,
            apply=lambda entries, snapshot: None,
            clock=lambda: clock[0],
            last_contact=last,
            remember_contact=stored.append,
        )

    first = client(None)
    assert first.contact_interval == 5.0
    first.handle_event("snapshot", _event("10", time=1000.0))
    for second in (1001.0, 1002.0, 1005.5, 1006.0):
        clock[0] = second
        first.handle_event("heartbeat", json.dumps({"revision": "10", "time": second}))
    assert stored == [1000.0, 1005.5]  # the snapshot, then one heartbeat 5 s later
    clock[0] = 1020.0  # the feed went down at 1006; the sidecar restarts at 1020
    restarted = client(stored[-1])
    assert restarted.status.last_contact == 1005.5 and restarted.status.started_at == 1020.0
    assert not restarted.status.stale(1035.5) and restarted.status.stale(1036.0)  # 30 s after 1005.5, not 1020
    assert client(None).status.stale(1050.5) and not client(None).status.stale(1050.0)  # nothing stored: from start
    assert client(5000.0).status.last_contact == 1020.0  # a stored time in the future counts as now


def test_ladder_actions_ride_on_snapshots_and_actions_events() -> None:
    """A snapshot hands over every action the authority keeps (and says it is a snapshot, so the
    sidecar can forward its own ones the authority lacks); an ``actions`` event the new ones; an
    older authority's snapshot without ``actions`` hands over none."""
    got: list[tuple[tuple[str, ...], bool]] = []
    client = FeedClient(
        RevocationFeedSpec(url="https://authority.authz.svc:8444", ca=Path("ca.pem"), max_staleness=30),
        ca_file=Path("ca.pem"),
        svid=lambda: None,
        apply=lambda entries, snapshot: None,
        apply_actions=lambda actions, snapshot: got.append((actions, snapshot)),
        clock=lambda: 1000.0,
    )
    client.handle_event("snapshot", json.dumps({"revision": "1", "time": 1000, "entries": [], "actions": ["a.b.c"]}))
    client.handle_event("actions", json.dumps({"revision": "2", "time": 1000, "actions": ["d.e.f"]}))
    client.handle_event("snapshot", json.dumps({"revision": "3", "time": 1000, "entries": []}))
    assert got == [(("a.b.c",), True), (("d.e.f",), False), ((), True)]
    assert client.status.events["actions"] == 1
    with pytest.raises(FeedError):
        client.handle_event("actions", json.dumps({"revision": "4", "time": 1000, "actions": [5]}))
