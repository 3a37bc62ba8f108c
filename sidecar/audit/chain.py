"""The hash chain over decision records: canonical form, linking and verification.

Every record carries ``seq`` (0, 1, 2, … with no gaps), ``prev_hash`` (the ``hash`` of the record
before it; 64 zeros for ``seq`` 0) and ``hash``::

    canonical(record) = UTF-8 JSON of the record WITHOUT its "hash" member, keys sorted by code point
                        at every level, no whitespace (separators "," and ":"), non-ASCII characters
                        unescaped, control characters escaped as \\b \\f \\n \\r \\t or \\u00XX,
                        integers in decimal (records hold no floats)
    hash = lower-case hex of SHA-256(canonical(record))              (no key)
         | lower-case hex of HMAC-SHA256(key, canonical(record))     (decision_log.hmac_key_file)

In Python, ``canonical`` equals
``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()``; the unit
tests check that equivalence, so anyone can verify a log with the standard library alone. With an HMAC
key, someone who can write the log file but does not hold the key cannot recompute the chain.

The chain runs across rotated files: the first record of a new file links to the last of the previous
one, and a restarted sidecar continues from the last record on disk.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sidecar.config.loader import read_secret_file
from sidecar.errors import KeyLoadError

__all__ = [
    "GENESIS",
    "Break",
    "ChainHead",
    "Verification",
    "canonical",
    "link",
    "load_hmac_key",
    "record_hash",
    "verify_lines",
]

GENESIS = "0" * 64
"""``prev_hash`` of the first record of a chain (``seq`` 0)."""
MIN_KEY_BYTES = 16


def load_hmac_key(path: Path, *, file: str, field: str) -> bytes:
    """Read an HMAC key: the file's bytes without surrounding whitespace (a trailing newline is fine).

    Raises:
        KeyLoadError: unreadable, or shorter than 16 bytes.
    """
    key = read_secret_file(path, file=file, field=field).strip()
    if len(key) < MIN_KEY_BYTES:
        raise KeyLoadError(file, field, f"{path}: an HMAC key needs at least {MIN_KEY_BYTES} bytes")
    return key


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of a chain: the next record gets ``seq + 1`` and ``prev_hash = hash``."""

    seq: int
    hash: str

    @classmethod
    def start(cls) -> ChainHead:
        """The head before the first record (the next ``seq`` is 0, ``prev_hash`` is :data:`GENESIS`)."""
        return cls(-1, GENESIS)


def canonical(record: dict[str, Any]) -> bytes:
    """The canonical bytes of ``record`` (see the module docstring); ``hash`` is left out.

    Raises:
        TypeError: a value is not JSON-serializable (e.g. a lone surrogate in a string).
    """
    if "hash" in record:
        record = {k: v for k, v in record.items() if k != "hash"}
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any], key: bytes | None = None) -> str:
    """Lower-case hex SHA-256 (or HMAC-SHA256 with ``key``) of :func:`canonical` ``(record)``."""
    data = canonical(record)
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def link(record: dict[str, Any], head: ChainHead, key: bytes | None = None) -> tuple[bytes, ChainHead]:
    """Chain ``record`` after ``head``.

    Sets ``seq``, ``prev_hash`` and ``hash`` in ``record`` (in place, in that order, at the end) and
    returns the JSON line to write (with a trailing newline) and the new head. The caller commits the
    new head only once the line is written.

    Raises:
        TypeError: the record is not JSON-serializable.
    """
    record["seq"] = head.seq + 1
    record["prev_hash"] = head.hash
    record.pop("hash", None)
    digest = record_hash(record, key)
    record["hash"] = digest
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE), ChainHead(head.seq + 1, digest)


@dataclass(frozen=True, slots=True)
class Break:
    """The first broken link of a chain.

    Attributes:
        source: the file (or ``"-"`` for stdin) holding the offending line.
        line: 1-based line number in ``source``.
        seq: the ``seq`` the line claims, when it has one.
        kind: ``unparseable``, ``truncated``, ``not_chained``, ``hash_mismatch``, ``seq_gap``,
            ``out_of_order``, ``prev_hash_mismatch``, ``chain_start``, ``head_mismatch`` or
            ``truncated_end``.
        message: a sentence for people.
    """

    source: str
    line: int
    seq: int | None
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of :func:`verify_lines`.

    Attributes:
        records: how many records verified before the first break (all of them when intact).
        first_seq: ``seq`` of the first record, or ``None`` when there was none.
        head: the last verified record, or ``None``.
        broken: the first break, or ``None`` when intact.
    """

    records: int
    first_seq: int | None
    head: ChainHead | None
    broken: Break | None

    @property
    def intact(self) -> bool:
        """Whether no link is broken."""
        return self.broken is None


def _describe_gap(expected: int, seq: int) -> tuple[str, str]:
    if seq > expected:
        missing = seq - expected
        return "seq_gap", f"seq {seq} follows seq {expected - 1}: {missing} record(s) missing here (deleted or moved)"
    return "out_of_order", f"seq {seq} where seq {expected} was expected: records reordered or duplicated"


def verify_lines(
    lines: Iterable[tuple[str, int, bytes]],
    *,
    key: bytes | None = None,
    partial: bool = False,
    expect: ChainHead | None = None,
) -> Verification:
    """Check every link of a chain and report the first broken one.

    Args:
        lines: ``(source, line_number, raw_line)`` in chain order, each raw line including its
            trailing newline when it had one (a last line without one is a truncated record).
        key: the HMAC key the log was written with, or ``None`` for plain SHA-256.
        partial: accept a chain that does not start at ``seq`` 0 (earlier files were pruned or not
            copied); the first record's ``prev_hash`` is then taken on trust.
        expect: a head known from elsewhere (the running sidecar's ``/readyz``, or a copy taken
            earlier): the chain must contain exactly this record; verification stops there (so a
            record being appended meanwhile is not read), and a log that ends before it was cut
            short at the end (``truncated_end``).

    Returns:
        A :class:`Verification`. Edited records fail ``hash_mismatch``; deleted ones ``seq_gap``;
        swapped ones ``out_of_order``; a torn last line ``truncated``; a file missing at the start
        ``chain_start`` (unless ``partial``); a relinked record ``prev_hash_mismatch``; with
        ``expect``, a different record at that ``seq`` ``head_mismatch``.
    """
    head: ChainHead | None = None
    first_seq: int | None = None
    count = 0

    def broken(source: str, number: int, seq: int | None, kind: str, message: str) -> Verification:
        return Verification(count, first_seq, head, Break(source, number, seq, kind, message))

    for source, number, raw in lines:
        if not raw.endswith(b"\n"):
            return broken(source, number, None, "truncated", "the last line is cut short (truncated record)")
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return broken(source, number, None, "unparseable", "not a JSON record")
        if not isinstance(record, dict):
            return broken(source, number, None, "unparseable", "not a JSON object")
        seq, prev, digest = record.get("seq"), record.get("prev_hash"), record.get("hash")
        if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(digest, str)):
            return broken(source, number, None, "not_chained", "the record has no seq/prev_hash/hash")
        if head is None:
            if not partial and (seq != 0 or prev != GENESIS):
                return broken(
                    source,
                    number,
                    seq,
                    "chain_start",
                    f"the chain starts at seq {seq}, not 0: earlier records or files are missing "
                    "(use --partial to verify from here)",
                )
        elif seq != head.seq + 1:
            kind, message = _describe_gap(head.seq + 1, seq)
            return broken(source, number, seq, kind, message)
        elif prev != head.hash:
            return broken(
                source, number, seq, "prev_hash_mismatch", f"prev_hash does not match the hash of seq {head.seq}"
            )
        try:
            expected = record_hash(record, key)
        except TypeError:
            return broken(source, number, seq, "unparseable", "the record cannot be re-serialized")
        if not hmac.compare_digest(expected, digest):
            hint = "" if key is not None or count else " (was the log written with an HMAC key? pass --key)"
            return broken(source, number, seq, "hash_mismatch", f"hash mismatch: the record was altered{hint}")
        if first_seq is None:
            first_seq = seq
        head = ChainHead(seq, digest)
        count += 1
        if expect is not None and seq >= expect.seq:
            if head != expect:
                return broken(source, number, seq, "head_mismatch", f"seq {seq} is not the record expected there")
            return Verification(count, first_seq, head, None)
    if expect is not None and expect.seq >= 0:
        last = head.seq if head is not None else -1
        where = "(no records)" if head is None else f"at seq {last}"
        return Verification(
            count,
            first_seq,
            head,
            Break(
                "",
                0,
                None,
                "truncated_end",
                f"the log ends {where} but seq {expect.seq} was written: records were removed from the end",
            ),
        )
    return Verification(count, first_seq, head, None)
