"""Normalization of hosts and paths, including hostile inputs (RFC 3986 §3.2.2, §5.2.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import BadRequestError
from sidecar.http_norm import normalize_authority, normalize_path, split_credentials


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/../b", "/b"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("//a", "/a"),
        ("/a//b///c", "/a/b/c"),
        ("/a/./b/", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/", "/"),
        ("/%41%42c", "/ABc"),
        ("/caf%C3%A9", "/café"),
        ("/a%20b", "/a b"),
    ],
)
def test_paths_are_canonicalized(raw: str, expected: str) -> None:
    assert normalize_path(raw)[0] == expected


def test_query_is_split_off_and_left_alone() -> None:
    assert normalize_path("/a/b?x=%2F&y=../z") == ("/a/b", "x=%2F&y=../z")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/a%2Fb", "encoded '/'"),
        ("/a%2fb", "encoded '/'"),
        ("/a%5Cb", "encoded"),
        ("/a\\b", "backslash"),
        ("/a;x", "';'"),
        ("/a%3Bx", "';'"),
        ("/a#f", "fragment"),
        ("/a?q#f", "fragment"),
        ("a", "start with '/'"),
        ("", "start with '/'"),
        ("*", "start with '/'"),
        ("http://h/a", "start with '/'"),
        ("/a%zz", "percent-escape"),
        ("/a%", "percent-escape"),
        ("/a%4", "percent-escape"),
        ("/%ff", "UTF-8"),
        ("/%C3", "UTF-8"),
        ("/a%00b", "control"),
        ("/a%0d%0aX-Injected: 1", "control"),
        ("/a\r\nb", "control"),
        ("/a b", "space"),
        ("/" + "a" * 9000, "too long"),
    ],
)
def test_ambiguous_paths_are_rejected(raw: str, why: str) -> None:
    with pytest.raises(BadRequestError, match=why):
        normalize_path(raw)


@pytest.mark.parametrize(
    ("authority", "scheme", "expected"),
    [
        ("API.Example.COM", "http", ("api.example.com", 80)),
        ("host:443", "https", ("host", 443)),
        ("host", "https", ("host", 443)),
        ("host.", "http", ("host", 80)),
        ("host.:8080", "http", ("host", 8080)),
        ("10.0.0.1:81", "http", ("10.0.0.1", 81)),
        ("[::1]:8080", "http", ("[::1]", 8080)),
        ("[0:0::1]", "http", ("[::1]", 80)),
        ("under_score.internal", "http", ("under_score.internal", 80)),
    ],
)
def test_authorities_are_canonicalized(authority: str, scheme: str, expected: tuple[str, int]) -> None:
    assert normalize_authority(authority, scheme) == expected


def test_default_port_folds_with_explicit_one() -> None:
    assert normalize_authority("host:443", "https") == normalize_authority("host", "https")
    assert normalize_authority("host:80", "http") == normalize_authority("HOST.", "http")
    assert normalize_authority("host:443", "http") != normalize_authority("host", "http")


@pytest.mark.parametrize(
    "authority",
    [
        "",
        ":80",
        "host..",
        ".host",
        "-host",
        "host:",
        "host:0",
        "host:65536",
        "host:+80",
        "host:8a",
        "user@host",
        "ho st",
        "h%41st",
        "[::1",
        "[zz::1]",
        "[::1]x",
        "bücher.example",
        "a" * 64 + ".com",
        "host\r\n",
        "host:١٢",
    ],
)
def test_bad_authorities_are_rejected(authority: str) -> None:
    with pytest.raises(BadRequestError):
        normalize_authority(authority, "http")


@given(st.text(max_size=200))
def test_normalize_path_never_crashes(raw: str) -> None:
    """Any string either normalizes to a canonical path or raises BadRequestError."""
    try:
        path, _ = normalize_path(raw)
    except BadRequestError:
        return
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    # canonical form is a fixed point (dots and slashes; no '%' re-decoding surprises)
    if "%" not in path:
        assert normalize_path(path)[0] == path


@given(st.text(max_size=100))
def test_normalize_authority_never_crashes(raw: str) -> None:
    try:
        host, port = normalize_authority(raw, "http")
    except BadRequestError:
        return
    assert host == host.lower() and not host.endswith(".")
    assert 0 < port < 65536


# -- Authorization credentials (RFC 9110 §11.4, §5.3) ---------------------------------------------------
_TOKEN68 = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/", min_size=1, max_size=40
)
_JWT = st.tuples(_TOKEN68, _TOKEN68, _TOKEN68).map(lambda parts: ".".join(p.replace(".", "") or "x" for p in parts))
_SCHEME = st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Negotiate", "AWS4-HMAC-SHA256"])
_QUOTED = st.text(alphabet="abc ,=;", max_size=12).map(lambda v: '"' + v + '"')
_CREDENTIAL = st.one_of(
    st.tuples(_SCHEME, _JWT).map(" ".join),
    st.tuples(_SCHEME, _TOKEN68, st.sampled_from(["", "=", "=="])).map(lambda t: f"{t[0]} {t[1]}{t[2]}"),
    st.lists(
        st.tuples(st.sampled_from(["realm", "nonce", "uri", "qop"]), _QUOTED | _TOKEN68), min_size=1, max_size=4
    ).map(lambda params: "Digest " + ", ".join(f"{k}={v}" for k, v in params)),
    _SCHEME,
)
_SEPARATOR = st.sampled_from([",", ", ", " ,", " , ", ",\t", ",, "])


@given(st.lists(_CREDENTIAL, min_size=1, max_size=5), st.data())
def test_repeated_authorization_headers_split_back_into_their_credentials(
    credentials: list[str], data: st.DataObject
) -> None:
    """However many headers Envoy joined (and with whatever list whitespace), each credential comes back."""
    joined = credentials[0]
    for credential in credentials[1:]:
        joined += data.draw(_SEPARATOR) + credential
    assert [" ".join(c.split()) for c in split_credentials(joined)] == [" ".join(c.split()) for c in credentials]


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("", 0),
        ("Bearer a.b.c", 1),
        ("Bearer a.b.c, Bearer d.e.f", 2),
        ("Bearer a,b", 2),  # a token68 has no comma: what follows is another credential
        ('Digest username="x, y", realm="r", nonce=abc', 1),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l, Bearer a.b.c", 2),
        (" , Bearer a.b.c ,", 1),
    ],
)
def test_split_credentials_examples(value: str, count: int) -> None:
    assert len(split_credentials(value)) == count
