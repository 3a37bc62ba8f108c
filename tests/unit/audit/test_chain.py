"""The hash chain: canonical form, tamper detection, rotation, restart, HMAC, and the writer's files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.audit import reader
from sidecar.audit.chain import GENESIS, ChainHead, canonical, record_hash, verify_lines
from sidecar.audit.log import DecisionLog
from sidecar.audit.reader import iter_lines, log_files, tail_lines, tail_records

KEY = b"k" * 32

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_canonical_form_is_the_documented_stdlib_form(record: dict[str, Any]) -> None:
    """Anyone can verify with ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``."""
    expected = json.dumps(
        {k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert canonical(record) == expected
    assert record_hash(record) == hashlib.sha256(expected).hexdigest()


def _record(i: int, **extra: Any) -> dict[str, Any]:
    body = {
        "time": f"2026-11-29T09:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
        "decision_id": f"id{i:04d}",
        "task_id": "t1" if i % 2 else "t2",
        "decision": "allow" if i % 3 else "deny",
        "reason": "allowed" if i % 3 else "path_not_allowed",
        "path": f"/v1/items/{i}\r\n",
        "event": "decision",
    }
    body.update(extra)
    return body


def _write(path: Path, count: int, **log_args: Any) -> DecisionLog:
    log = DecisionLog(path, stdout=False, **log_args)
    for i in range(count):
        log.append(_record(i))
    log.close()
    return log


def _verify(path: Path, **kwargs: Any) -> Any:
    return verify_lines(iter_lines(log_files(path)), **kwargs)


def test_an_untouched_log_verifies_and_starts_at_genesis(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = _write(path, 5)
    lines = path.read_bytes().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["seq"] == 0 and first["prev_hash"] == GENESIS
    assert last["seq"] == 4 and log.head == ChainHead(4, last["hash"])
    result = _verify(path)
    assert result.intact and result.records == 5 and result.head == log.head


def _tamper(lines: list[bytes], kind: str, index: int) -> list[bytes]:
    out = list(lines)
    if kind == "edit":
        record = json.loads(out[index])
        record["decision"] = "deny" if record["decision"] == "allow" else "allow"
        out[index] = json.dumps(record).encode() + b"\n"
    elif kind == "delete":
        del out[index]
    elif kind == "swap":
        out[index], out[index + 1] = out[index + 1], out[index]
    elif kind == "truncate":
        out = [*out[:index], out[index][: len(out[index]) // 2]]
    elif kind == "recompute":  # edit and recompute the plain SHA-256 chain from there: only the HMAC stops it
        head = ChainHead(index - 1, json.loads(out[index - 1])["hash"]) if index else ChainHead.start()
        for j in range(index, len(out)):
            record = json.loads(out[j])
            if j == index:
                record["reason"] = "allowed"
            record["prev_hash"] = head.hash
            record["hash"] = record_hash(record)
            head = ChainHead(record["seq"], record["hash"])
            out[j] = json.dumps(record).encode() + b"\n"
    return out


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["edit", "delete", "swap", "truncate"]),
    count=st.integers(3, 12),
    position=st.floats(0, 1, exclude_max=True),
)
def test_tampering_is_always_detected(tmp_path: Path, kind: str, count: int, position: float) -> None:
    path = tmp_path / f"{kind}-{count}-{position}.log"
    _write(path, count)
    lines = path.read_bytes().splitlines(keepends=True)
    last = count - 2 if kind == "swap" else count - 1
    index = int(position * (last + 1))
    if kind == "delete" and index == count - 1:
        index -= 1  # deleting the very last record is caught by --expect (below), not by the chain alone
    path.write_bytes(b"".join(_tamper(lines, kind, index)))
    result = _verify(path)
    assert not result.intact
    assert result.broken is not None and result.broken.line >= 1
    assert result.records <= index + (1 if kind == "swap" else 0)


def test_break_kinds_name_what_happened(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 6)
    lines = path.read_bytes().splitlines(keepends=True)
    expected = {"edit": "hash_mismatch", "delete": "seq_gap", "swap": "seq_gap", "truncate": "truncated"}
    for kind, name in expected.items():
        path.write_bytes(b"".join(_tamper(lines, kind, 2 if kind != "truncate" else 5)))
        broken = _verify(path).broken
        assert broken is not None and broken.kind == name, (kind, broken)
        assert broken.line == (3 if kind != "truncate" else 6)


def test_deleting_records_at_the_end_is_caught_with_the_known_head(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = _write(path, 6)
    lines = path.read_bytes().splitlines(keepends=True)
    assert _verify(path, expect=log.head).intact
    path.write_bytes(b"".join(lines[:4]))
    assert _verify(path).intact  # a chain alone cannot see a cut at its end…
    broken = _verify(path, expect=log.head).broken
    assert broken is not None and broken.kind == "truncated_end"  # …the head the sidecar published can
    path.write_bytes(b"".join(_tamper(lines, "recompute", 3)))
    assert _verify(path).intact  # recomputed without a key: the chain alone is fooled…
    broken = _verify(path, expect=log.head).broken
    assert broken is not None and broken.kind == "head_mismatch"


def test_hmac_chain_cannot_be_recomputed_without_the_key(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 5, hmac_key=KEY)
    assert _verify(path, key=KEY).intact
    plain = _verify(path)
    assert plain.broken is not None and plain.broken.kind == "hash_mismatch" and "--key" in plain.broken.message
    wrong = _verify(path, key=b"x" * 32)
    assert not wrong.intact
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(_tamper(lines, "recompute", 2)))
    broken = _verify(path, key=KEY).broken
    assert broken is not None and broken.kind == "hash_mismatch" and broken.line == 3


def test_size_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = _write(path, 40, max_bytes=4096)
    files = log_files(path)
    assert len(files) >= 3 and files[-1] == path and log.rotations == len(files) - 1
    assert all(f.stat().st_size <= 4096 for f in files)
    for rotated in files[:-1]:  # named after the seq of their first record
        first = json.loads(rotated.read_bytes().splitlines()[0])
        assert rotated.name == f"decisions.log.{first['seq']:012d}"
    result = _verify(path)
    assert result.intact and result.records == 40
    first_of_current = json.loads(path.read_bytes().splitlines()[0])
    last_of_previous = json.loads(files[-2].read_bytes().splitlines()[-1])
    assert first_of_current["prev_hash"] == last_of_previous["hash"]


@pytest.mark.parametrize("damage", ["delete_file", "relink", "reorder_files"])
def test_a_break_across_rotation_is_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 40, max_bytes=4096)
    files = log_files(path)
    if damage == "delete_file":
        files[1].unlink()
    elif damage == "relink":  # the first record of the current file no longer links to the last of the previous
        lines = path.read_bytes().splitlines(keepends=True)
        record = json.loads(lines[0])
        record["prev_hash"] = "f" * 64
        record["hash"] = record_hash(record)
        path.write_bytes(json.dumps(record).encode() + b"\n" + b"".join(lines[1:]))
    else:
        a, b = files[0].read_bytes(), files[1].read_bytes()
        files[0].write_bytes(b)
        files[1].write_bytes(a)
    broken = _verify(path).broken
    assert broken is not None
    assert broken.kind in {"seq_gap", "prev_hash_mismatch", "chain_start", "out_of_order"}


def test_age_rotation_and_pruning(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, stdout=False, max_age=60, keep=2, clock=lambda: now[0])
    for i in range(10):
        log.append(_record(i))
        now[0] += 25  # a new file every third record
    log.close()
    files = log_files(path)
    assert len(files) == 3  # two rotated kept + the current one
    result = _verify(path)
    assert result.broken is not None and result.broken.kind == "chain_start"  # the oldest file was pruned
    partial = _verify(path, partial=True)
    assert partial.intact and partial.head == log.head and partial.first_seq and partial.first_seq > 0


def test_a_restart_continues_the_chain_even_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    first = _write(path, 5)
    second = _write(path, 3)
    assert second.head.seq == 7
    assert _verify(path).intact
    os.rename(path, reader.rotated_name(path, 0))  # a restart right after a rotation: the current file is new
    third = _write(path, 2)
    assert third.head.seq == 9 and first.head.seq == 4
    result = _verify(path)
    assert result.intact and result.records == 10


def test_a_torn_record_from_a_crash_is_kept_as_evidence_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 3)
    with path.open("ab") as handle:
        handle.write(b'{"time": "2026-11-29T09:00:00.000Z", "decis')  # a crash mid-record
    log = _write(path, 2)
    assert log.head.seq == 4  # continues from the last complete record
    broken = _verify(path).broken
    assert broken is not None and broken.kind == "unparseable" and broken.line == 4


def test_tail_and_reverse_reading(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 30, max_bytes=4096)
    tail = tail_records(log_files(path), 12)
    assert [r["seq"] for r in tail] == list(range(18, 30))


def test_tail_lines_are_the_tail_records_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    _write(path, 30, max_bytes=4096)  # rotated: the tail spans files
    with path.open("ab") as handle:
        handle.write(b"not json\n[1, 2]\n")  # neither is a record: skipped, not counted
    lines = tail_lines(log_files(path), 12)
    assert [orjson.loads(line) for line in lines] == tail_records(log_files(path), 12)
    assert [orjson.loads(line)["seq"] for line in lines] == list(range(18, 30))
    assert not [line for line in lines if line.endswith(b"\n")]
    every = [raw.rstrip(b"\n") for _, _, raw in iter_lines(log_files(path))]
    assert tail_lines(log_files(path), 100) == every[:30]  # the 30 records; the two junk lines last


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=10), st.binary(max_size=9))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reverse_lines_matches_forward_reading(tmp_path: Path, lines: list[bytes], torn: bytes) -> None:
    data = b"".join(line + b"\n" for line in lines) + torn.replace(b"\n", b"")
    path = tmp_path / "r.log"
    path.write_bytes(data)
    original = reader._BLOCK
    reader._BLOCK = 7  # force many block boundaries
    try:
        backwards = list(reader._reverse_lines(path))
    finally:
        reader._BLOCK = original
    parts = data.split(b"\n")
    forwards = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    assert backwards == forwards[::-1]


def test_record_filter() -> None:
    record = _record(4, agent="spiffe://a/x", caller="spiffe://c/y")
    assert reader.RecordFilter(task="t2", decision="allow", agent="spiffe://a/x", caller="spiffe://c/y").matches(record)
    assert not reader.RecordFilter(caller="spiffe://c/other").matches(record)
    assert not reader.RecordFilter(reason="path_not_allowed").matches(record)
    when = reader.parse_time(record["time"])
    assert reader.RecordFilter(since=when, until=when).matches(record)
    assert not reader.RecordFilter(since=when + 0.001).matches(record)
    assert not reader.RecordFilter(since=0).matches({"time": "garbage"})
