"""The strict JSON-RPC reader: every ambiguity refused with its own sub-code; property tests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.agentproto.jsonrpc import MAX_DEPTH, BodyError, BodyProblem, MessageKind, parse_message

CAP = 64 * 1024


def _parse(body: bytes, **kwargs: object) -> object:
    return parse_message(body, cap=kwargs.pop("cap", CAP), **kwargs)  # type: ignore[arg-type]


def _problem(body: bytes, **kwargs: object) -> BodyProblem:
    with pytest.raises(BodyError) as info:
        _parse(body, **kwargs)
    assert str(info.value).startswith(info.value.problem.value + ": ")
    return info.value.problem


def test_request_notification_response() -> None:
    call = _parse(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"query","arguments":{}}}')
    assert (call.kind, call.method, call.id, call.param_str("name")) == (MessageKind.REQUEST, "tools/call", 7, "query")
    note = _parse(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert (note.kind, note.id, note.params) == (MessageKind.NOTIFICATION, None, None)
    answer = _parse(b'{"jsonrpc":"2.0","id":"a","result":{}}')
    assert (answer.kind, answer.method) == (MessageKind.RESPONSE, "")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list"}', BodyProblem.DUPLICATE_KEY),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\\u0061me":"b"}}',
            BodyProblem.DUPLICATE_KEY,
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"arguments":{"t":1,"t":2}}}', BodyProblem.DUPLICATE_KEY),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', BodyProblem.BATCH),
        (b"\xef\xbb\xbf{}", BodyProblem.BOM),
        (b'{"jsonrpc":"2.0","id":1,"method":"\xff"}', BodyProblem.NOT_UTF8),
        ('{"a":1}'.encode("utf-16"), BodyProblem.NOT_UTF8),
        (b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}', BodyProblem.LONE_SURROGATE),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"\\udfff":1}}', BodyProblem.LONE_SURROGATE),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"v":NaN}}', BodyProblem.INVALID_JSON),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"v":1e400}}', BodyProblem.INVALID_JSON),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"v":' + b"9" * 5000 + b"}}", BodyProblem.INVALID_JSON),
        (b'{"jsonrpc":"2.0","id":1,"method":"x"} {}', BodyProblem.INVALID_JSON),
        (b"", BodyProblem.INVALID_JSON),
        (b'"just a string"', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"1.0","id":1,"method":"x"}', BodyProblem.NOT_JSONRPC),
        (b'{"id":1,"method":"x"}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":true,"method":"x"}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"x"}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"method":3}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":"s"}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","extra":1}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","result":{}}', BodyProblem.NOT_JSONRPC),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","result":{}}', BodyProblem.NOT_JSONRPC),
    ],
)
def test_refused(body: bytes, problem: BodyProblem) -> None:
    assert _problem(body) is problem


def test_cap_encoding_and_media_type() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    assert _parse(body, cap=len(body)).method == "ping"
    assert _problem(body, cap=len(body) - 1) is BodyProblem.TOO_LARGE
    for encoding in ("gzip", "br", "deflate", "identity, gzip"):
        assert _problem(body, content_encoding=encoding) is BodyProblem.CONTENT_ENCODING
    assert _parse(body, content_encoding="identity").method == "ping"
    for media in (None, "text/plain", "application/jsonx", "application/json; charset=latin-1"):
        assert _problem(body, content_type=media) is BodyProblem.CONTENT_TYPE
    assert _parse(body, content_type="Application/JSON; charset=UTF-8").method == "ping"


def test_depth() -> None:
    def nested(depth: int) -> bytes:  # the message object is depth 1, params 2, ...
        inner = "1"
        for _ in range(depth - 2):
            inner = "[" + inner + "]"
        return ('{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + inner + "}}").encode()

    assert _parse(nested(MAX_DEPTH)).method == "x"
    assert _problem(nested(MAX_DEPTH + 1)) is BodyProblem.TOO_DEEP
    assert _problem(b"[" * 100_000 + b"]" * 100_000, cap=1 << 20) in (BodyProblem.TOO_DEEP, BodyProblem.BATCH)
    assert _problem(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, cap=1 << 20) is BodyProblem.TOO_DEEP


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_value_is_read_exactly_or_refused(value: object) -> None:
    """Whatever the arguments, the reader either returns exactly what json.dumps wrote or refuses
    with a sub-code - it never crashes, and never returns something else."""
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": {"v": value}}}
    body = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        parsed = _parse(body, cap=1 << 20)
    except BodyError as exc:
        assert exc.problem in (BodyProblem.LONE_SURROGATE, BodyProblem.NOT_UTF8, BodyProblem.TOO_DEEP)
        return
    assert parsed.params == message["params"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_crash(body: bytes) -> None:
    try:
        parsed = _parse(body)
    except BodyError as exc:
        assert isinstance(exc.problem, BodyProblem)
    else:
        assert parsed.kind in MessageKind


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6), st.integers(), min_size=1, max_size=5), st.data())
def test_any_duplicated_name_is_refused(members: dict[str, int], data: st.DataObject) -> None:
    """A name written twice - as is, or with one character escaped - is refused at any depth."""
    name = data.draw(st.sampled_from(sorted(members)))
    head = f"\\u{ord(name[0]):04x}" if ord(name[0]) < 0x10000 else json.dumps(name[0])[1:-1]
    escaped = head + json.dumps(name[1:])[1:-1]
    inner = ",".join(f"{json.dumps(k)}:{v}" for k, v in members.items()) + f',"{escaped}":0'
    depth = data.draw(st.integers(0, 5))
    body = '{"jsonrpc":"2.0","id":1,"method":"x","params":' + "[" * depth + "{" + inner + "}" + "]" * depth + "}"
    assert _problem(body.encode()) is BodyProblem.DUPLICATE_KEY
