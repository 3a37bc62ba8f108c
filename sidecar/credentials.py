"""Static API keys injected by the sidecar (so the agent never holds them).

A credential file holds one line of printable ASCII (surrounding whitespace is stripped); the value
set in the header is ``prefix + content``. Values are validated at load so a CR/LF can never reach a
header, and they are never logged (:class:`~sidecar.policy.model.Credential` hides them from ``repr``).
"""

from __future__ import annotations

import re

from sidecar.errors import KeyLoadError

__all__ = ["credential_value"]

_HEADER_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")


def credential_value(raw: bytes, prefix: str, *, file: str, field: str) -> str:
    """The header value for a credential file's content.

    Args:
        raw: the file's bytes.
        prefix: e.g. ``"Bearer "``.
        file / field: where it was configured, for errors.

    Raises:
        KeyLoadError: not one line of printable ASCII.
    """
    try:
        value = prefix + raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyLoadError(file, field, "credential must be printable ASCII") from None
    if not _HEADER_VALUE.match(value):
        raise KeyLoadError(file, field, "credential must be one line of printable ASCII")
    return value
