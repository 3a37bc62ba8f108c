"""Canonical form of the host, port and path a request names.

Policy matches the canonical form only, and Envoy is configured (``normalize_path``,
``merge_slashes``, ``path_with_escaped_slashes_action: REJECT_REQUEST``) so that the upstream
receives the same path. Anything that could be read two ways is rejected with
:class:`~sidecar.errors.BadRequestError` instead of guessed:

* an encoded ``/`` or ``\\`` (``%2F``, ``%5C``), a raw ``\\``, a path parameter ``;``,
* a fragment ``#``, a path that does not start with ``/``,
* control characters, invalid percent-escapes, percent-escapes that are not UTF-8.

Implements RFC 3986 §3.2.2 (host case), §3.2.3 (default port), §5.2.4 (dot-segment removal),
§3.5 (fragments never reach a server).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from sidecar.errors import BadRequestError

__all__ = ["DEFAULT_PORTS", "Target", "normalize_authority", "normalize_path", "normalize_target", "split_credentials"]

DEFAULT_PORTS = {"http": 80, "https": 443}

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_CTL = re.compile(r"[\x00-\x20\x7f]")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})?")
_MAX_HOST = 253
_MAX_PATH = 8192
_AUTH_PARAM = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+[ \t]*=")  # RFC 9110 §11.2 auth-param: token BWS "="
_QUOTED_OR_COMMA = re.compile(r'"(?:[^"\\]|\\.)*"?|,')


@dataclass(frozen=True, slots=True)
class Target:
    """The canonical request target.

    Attributes:
        host: lower-case DNS name without trailing dot, dotted IPv4, or ``[v6]``.
        port: 1..65535; the scheme's default port when none was given.
        path: percent-decoded once, dot segments removed, repeated slashes merged; no query.
        query: the raw query string (without ``?``), not decoded.
    """

    host: str
    port: int
    path: str
    query: str


def normalize_authority(authority: str, scheme: str = "http") -> tuple[str, int]:
    """Split and canonicalize an ``:authority`` value.

    Args:
        authority: ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.
        scheme: ``http`` or ``https``; gives the default port.

    Returns:
        ``(host, port)`` with the host lower-cased and one trailing dot removed.

    Raises:
        BadRequestError: empty host, bad characters, bad port, label or name too long.
    """
    if not authority:
        raise BadRequestError("empty host")
    if "@" in authority or _CTL.search(authority) or "%" in authority:
        raise BadRequestError("invalid characters in host")
    default = DEFAULT_PORTS.get(scheme.lower())
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadRequestError("unterminated IPv6 literal")
        literal, rest = authority[1:end], authority[end + 1 :]
        try:
            ip6 = ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadRequestError("invalid IPv6 literal") from None
        host = f"[{ip6.compressed}]"
        if rest and (not rest.startswith(":") or rest == ":"):
            raise BadRequestError("garbage after IPv6 literal")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
        elif not port_text:
            raise BadRequestError("empty port")
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not host or len(host) > _MAX_HOST:
            raise BadRequestError("empty or overlong host")
        labels = host.split(".")
        if not all(_LABEL.match(label) for label in labels):
            raise BadRequestError("invalid host name")
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise BadRequestError("invalid port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise BadRequestError("port out of range")
    elif default is not None:
        port = default
    else:
        raise BadRequestError(f"no port and unknown scheme {scheme!r}")
    return host, port


def _percent_decode(raw: str) -> str:
    if "%" not in raw:
        return raw
    out = bytearray()
    pos = 0
    for match in _PCT.finditer(raw):
        hexpair = match.group(1)
        if hexpair is None:
            raise BadRequestError("invalid percent-escape in path")
        byte = int(hexpair, 16)
        if byte in (0x2F, 0x5C):
            raise BadRequestError("encoded '/' or '\\' in path")
        if byte < 0x20 or byte == 0x7F:
            raise BadRequestError("encoded control character in path")
        out += raw[pos : match.start()].encode()
        out.append(byte)
        pos = match.end()
    out += raw[pos:].encode()
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("percent-escapes in path are not UTF-8") from None


def normalize_path(raw: str) -> tuple[str, str]:
    """Canonicalize a ``:path`` value.

    Args:
        raw: the request path as Envoy reports it, query included.

    Returns:
        ``(path, query)``: the canonical path (RFC 3986 §5.2.4, slashes merged, decoded once) and
        the raw query string.

    Raises:
        BadRequestError: see the module docstring for the rejected forms.
    """
    if not raw.startswith("/"):
        raise BadRequestError("path does not start with '/'")
    if len(raw) > _MAX_PATH:
        raise BadRequestError("path too long")
    if "#" in raw:
        raise BadRequestError("fragment in request target")
    path, _, query = raw.partition("?")
    if _CTL.search(path):
        raise BadRequestError("control character or space in path")
    if "\\" in path:
        raise BadRequestError("backslash in path")
    if ";" in path:
        raise BadRequestError("path parameter ';' in path")
    decoded = _percent_decode(path)
    if ";" in decoded:
        raise BadRequestError("path parameter ';' in path")
    segments = decoded.split("/")[1:]
    out: list[str] = []
    trailing = False
    for seg in segments:
        trailing = False
        if seg in ("", "."):
            trailing = True
            continue
        if seg == "..":
            if out:
                out.pop()
            trailing = True
            continue
        out.append(seg)
    canonical = "/" + "/".join(out)
    if trailing and out:
        canonical += "/"
    return canonical, query


def normalize_target(authority: str, raw_path: str, scheme: str = "http") -> Target:
    """Normalize authority and path together; see :func:`normalize_authority`, :func:`normalize_path`.

    Raises:
        BadRequestError: either part is malformed.
    """
    host, port = normalize_authority(authority, scheme)
    path, query = normalize_path(raw_path)
    return Target(host, port, path, query)


def split_credentials(value: str) -> list[str]:
    """The credentials in an ``Authorization`` value: one, or several when the header was repeated
    (Envoy, like any proxy, joins repeated headers with commas; RFC 9110 §5.3).

    A credential is ``auth-scheme [ 1*SP ( token68 / #auth-param ) ]`` (RFC 9110 §11.4): a list
    element that is an ``auth-param`` (``name=value``, e.g. Digest's ``realm="x"``) continues the
    credential before it; any other non-empty element starts a new one. Commas inside quoted strings
    do not split.

    Returns:
        The credentials, stripped (empty list elements dropped).
    """
    elements: list[str] = []
    start = 0
    for match in _QUOTED_OR_COMMA.finditer(value):
        if match.group() == ",":
            elements.append(value[start : match.start()])
            start = match.end()
    elements.append(value[start:])
    credentials: list[str] = []
    for raw in elements:
        element = raw.strip(" \t")
        if not element:
            continue
        if credentials and _AUTH_PARAM.match(element):
            credentials[-1] += ", " + element
        else:
            credentials.append(element)
    return credentials
