"""The pod's resolvers: the ``nameserver`` lines of the resolv.conf it was given (resolv.conf(5))."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from sidecar.errors import ConfigError

__all__ = ["read_nameservers"]

_MAX_BYTES = 64 * 1024
DNS_PORT = 53


def read_nameservers(path: Path, *, file: str, field: str = "dns.resolv_conf") -> tuple[tuple[str, int], ...]:
    """The ``(address, 53)`` of each ``nameserver`` line, in order (glibc reads at most three; so do we).

    A scoped IPv6 address (``fe80::1%eth0``) keeps its scope. Comments (``#``, ``;``) and other
    options are ignored.

    Args:
        path: the resolv.conf.
        file / field: named in errors.

    Raises:
        ConfigError: unreadable, over 64 KiB, or naming no usable nameserver.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(file, field, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > _MAX_BYTES:
        raise ConfigError(file, field, f"{path} is larger than {_MAX_BYTES} bytes")
    servers: list[tuple[str, int]] = []
    for raw in data.decode("utf-8", "replace").splitlines():
        words = raw.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        address, _, scope = words[1].partition("%")
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            continue
        servers.append((f"{parsed}%{scope}" if scope else str(parsed), DNS_PORT))
    if not servers:
        raise ConfigError(file, field, f"{path} names no nameserver")
    return tuple(servers[:3])
