"""The viewer's recent records: kept as JSON bytes, bounded by count and by bytes, decoded on query."""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.admin.viewer import RECENT, RECENT_BYTES, DecisionFeed
from sidecar.audit.log import DecisionLog
from sidecar.audit.reader import RecordFilter, log_files, parse_time, tail_lines
from sidecar.config.schema import ViewerSpec

AGENT = "spiffe://test.example/ns/agents/sa/worker"


def record(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "time": f"2025-01-01T00:00:{n:02d}.000Z",
        "decision_id": f"d-{n:04d}",
        "direction": "egress",
        "agent": AGENT,
        "caller": None,
        "task_id": f"t{n % 3}",
        "host": "api.internal",
        "port": 443,
        "path": f"/v1/items/{n}",
        "decision": "allow" if n % 2 else "deny",
        "reason": "allowed" if n % 2 else "path_not_allowed",
        "detail": "",
        "event": "decision",
        "seq": n,
        **extra,
    }


def size(value: dict[str, Any]) -> int:
    return len(orjson.dumps(value))


def test_the_oldest_records_go_first_when_the_bytes_are_used_up() -> None:
    first = [record(n) for n in range(10)]
    each = max(map(size, first))
    feed = DecisionFeed(first[:4], max_bytes=4 * each + each // 2)  # room for four records, not five
    assert [r["seq"] for r in feed.records()] == [0, 1, 2, 3]
    for r in first[4:]:
        feed.publish(r)
        assert feed.size <= 4 * each + each // 2
    assert [r["seq"] for r in feed.records()] == [6, 7, 8, 9]
    assert len(feed) == 4
    assert feed.size == sum(size(r) for r in first[6:])
    assert feed.get("d-0005") is None and feed.get("d-0006") == first[6]
    # the counts are over every record seen, not only the kept ones
    assert sum(a + d for where in feed.counts().values() for a, d in where.values()) == 10


def test_the_count_bounds_the_records_too() -> None:
    feed = DecisionFeed([record(n) for n in range(8)], capacity=5, max_bytes=RECENT_BYTES)
    assert [r["seq"] for r in feed.records()] == [3, 4, 5, 6, 7]
    feed.publish(record(8))
    assert [r["seq"] for r in feed.records()] == [4, 5, 6, 7, 8]
    assert feed.size == sum(size(record(n)) for n in range(4, 9))


def test_a_record_larger_than_the_bound_is_not_kept_but_counted_and_sent_live() -> None:
    async def run() -> None:
        small = [record(n) for n in range(3)]
        feed = DecisionFeed(small, max_bytes=64 * 1024)
        subscriber = feed.subscribe(RecordFilter())
        huge = record(3, detail="x" * (64 * 1024))
        feed.publish(huge)
        assert feed.records() == small  # the others stay
        assert feed.get("d-0003") is None
        assert feed.query(RecordFilter(), 10) == small[::-1]
        assert subscriber.queue.get_nowait() == ("decision", huge)
        assert feed.counts()["t0"]["api.internal:443"] == [1, 1]  # record 0 denied, the huge 3 allowed
        feed.publish(record(4))
        assert [r["seq"] for r in feed.records()] == [0, 1, 2, 4]

    asyncio.run(run())


def test_queries_and_filters_work_on_the_bytes_form() -> None:
    records = [record(n) for n in range(12)]
    records[5] |= {"mcp": {"method": "tools/call", "tool": "search", "decided_from": "body"}}
    records[7] |= {"a2a": {"method": "SendMessage", "decided_from": "body"}}
    records[9] |= {"direction": "ingress", "caller": 'spiffe://x/"quoted"\u00e9</script>'}
    records[10] |= {"detail": "task_id t1 named in a string", "task_id": None}
    feed = DecisionFeed(records)

    def seqs(selected: RecordFilter, limit: int = 100) -> list[int]:
        return [r["seq"] for r in feed.query(selected, limit)]

    assert seqs(RecordFilter()) == list(range(11, -1, -1))  # newest first
    assert seqs(RecordFilter(), limit=3) == [11, 10, 9]
    assert seqs(RecordFilter(task="t1")) == [7, 4, 1]  # not 10: its task_id is null
    assert seqs(RecordFilter(task="t1", decision="deny")) == [4]
    assert seqs(RecordFilter(decision="allow"), limit=2) == [11, 9]
    assert seqs(RecordFilter(reason="path_not_allowed")) == [10, 8, 6, 4, 2, 0]
    assert seqs(RecordFilter(agent=AGENT)) == list(range(11, -1, -1))
    assert seqs(RecordFilter(agent="spiffe://test.example/ns/agents/sa/other")) == []
    assert seqs(RecordFilter(caller='spiffe://x/"quoted"\u00e9</script>')) == [9]
    assert seqs(RecordFilter(tool="search")) == [5]
    assert seqs(RecordFilter(rpc_method="SendMessage")) == [7]
    assert seqs(RecordFilter(rpc_method="tools/call", tool="search")) == [5]
    assert seqs(RecordFilter(tool="tools/call")) == []  # a method is not a tool
    assert seqs(RecordFilter(since=parse_time(records[8]["time"]), until=parse_time(records[10]["time"]))) == [10, 9, 8]
    assert feed.get("d-0009") == records[9]
    assert feed.get("d-0099") is None
    assert feed.records() == records


def test_get_finds_the_record_not_one_naming_its_id_elsewhere() -> None:
    feed = DecisionFeed([record(1), record(2, detail='"decision_id":"d-0001"', path="/d-0001")])
    assert feed.get("d-0001") == record(1)


def test_what_the_feed_returns_is_a_copy() -> None:
    feed = DecisionFeed([record(1)])
    feed.query(RecordFilter(), 1)[0]["task_id"] = "changed"
    feed.records()[0]["path"] = "/changed"
    got = feed.get("d-0001")
    assert got is not None
    got["decision"] = "changed"
    assert feed.records() == [record(1)]


def test_the_decision_log_hands_the_feed_the_line_it_wrote(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "decisions.log", stdout=False)
    feed = DecisionFeed([])
    log.listeners.append(feed.publish)
    for n in range(5):
        log.append(record(n))
    on_disk = [orjson.loads(line) for line in (tmp_path / "decisions.log").read_bytes().splitlines()]
    assert feed.records() == on_disk  # with seq, prev_hash and hash as chained
    assert feed.size == (tmp_path / "decisions.log").stat().st_size - 5  # without the newlines
    log.close()


def test_a_kept_record_takes_its_size_not_orjsons_write_buffer() -> None:
    feed = DecisionFeed([])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(500):  # as the decision log hands them over: fresh orjson output, dropped after
            r = record(n)
            feed.publish(r, orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE))
        del r
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    kept = sum(sys.getsizeof(orjson.dumps(record(n))) for n in range(500))
    assert feed.size < kept < feed.size + 500 * 64
    assert grown < 1.5 * kept  # orjson's bytes hold ~8 KiB each: a feed keeping them would grow ~25x


def test_the_defaults_and_the_config_key() -> None:
    assert RECENT == 10_000
    assert ViewerSpec().recent_bytes == RECENT_BYTES == 8 * 1024 * 1024
    assert ViewerSpec.model_validate({"recent_bytes": "32MiB"}).recent_bytes == 32 * 1024 * 1024
    for bad in ("1KiB", "2GiB", 0):
        with pytest.raises(ValueError, match="recent_bytes must be between 64 KiB and 1 GiB"):
            ViewerSpec.model_validate({"recent_bytes": bad})


def test_the_lines_of_the_log_at_start_are_kept_as_they_are(tmp_path: Path) -> None:
    """At start the feed takes the log's last lines (``tail_lines``): decoded one at a time for the
    counts, kept as the bytes read; a line that is no decision record is skipped."""
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, stdout=False)
    for n in range(6):
        log.append(record(n))
    log.close()
    with path.open("ab") as handle:
        handle.write(b'{"event": "other"}\n')
    lines = tail_lines(log_files(path), RECENT)
    assert len(lines) == 7
    feed = DecisionFeed([*lines, b"not json"], max_bytes=RECENT_BYTES)
    assert feed.records() == [orjson.loads(line) for line in lines[:6]]
    assert all(kept is line for kept, line in zip(feed._recent, lines, strict=False))  # no copies
    assert feed.size == sum(map(len, lines[:6]))
    assert sum(a + d for where in feed.counts().values() for a, d in where.values()) == 6
    assert feed.query(RecordFilter(task="t1"), 10) == [orjson.loads(lines[4]), orjson.loads(lines[1])]
