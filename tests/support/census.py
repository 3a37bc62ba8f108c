"""The socket census of a running pod: what listens in its network namespace, whose it is, and what
``docs/security/socket-census.md`` says about it.

:func:`listeners` reads ``/proc/net/{tcp,tcp6,udp,udp6,unix}`` inside the pod's network namespace
(every listening TCP socket, every bound UDP socket, every listening - or bound datagram - Unix
socket, abstract names included) - never a hand-written list. :func:`socket_owners` finds the
process holding each (``/proc/*/fd``), so the test can tell which container it belongs to.
:func:`census_rows` parses the documented table: one row per socket, keyed by the code span that
starts its first cell (``tcp 127.0.0.1:15001``, ``unix /run/agent-authz/ctl/authz.sock``), with the
bold verdict of its "the agent" cell.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OWN_ROW", "CensusRow", "Listener", "census_rows", "listeners", "socket_owners"]

OWN_ROW = "* (the pod's own containers)"
"""The key of the row that covers the sockets of the pod's own containers."""
_ACCEPTCON = 0x10000
_UNIX_DGRAM = 2


@dataclass(frozen=True)
class Listener:
    """One socket that can be reached in the pod's network namespace.

    Attributes:
        proto: ``tcp``, ``udp`` or ``unix``.
        address: ``127.0.0.1:15001``, ``[::1]:15001``, or the Unix socket's path (``@name``: abstract).
        uid: the socket's owner from ``/proc/net`` (``None`` for Unix sockets).
        inode: the socket's inode (to find its process).
    """

    proto: str
    address: str
    uid: int | None
    inode: int

    @property
    def key(self) -> str:
        return f"{self.proto} {self.address}"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True)
class CensusRow:
    """One row: its socket key, the rest of its first cell (``label``: a ``(with …)`` marks a row of
    another configuration), the container it belongs to, the verdict and what the socket can do."""

    key: str
    label: str
    container: str
    verdict: str
    text: str


def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four host-order 32-bit words
    return f"[{ipaddress.IPv6Address(words)}]"


def _read(netns: str, name: str) -> list[str]:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "cat", f"/proc/net/{name}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return out.splitlines()[1:]


def listeners(netns: str) -> list[Listener]:
    """Every socket of network namespace ``netns`` that another process could connect or send to."""
    found = []
    tables = (("tcp", "tcp", "0A"), ("tcp", "tcp6", "0A"), ("udp", "udp", "07"), ("udp", "udp6", "07"))
    for proto, name, state in tables:
        for line in _read(netns, name):
            fields = line.split()
            if fields[3] != state:  # 0A: TCP_LISTEN; 07: TCP_CLOSE, i.e. a bound, unconnected UDP socket
                continue
            address, port = fields[1].split(":")
            found.append(Listener(proto, f"{_ip(address)}:{int(port, 16)}", int(fields[7]), int(fields[9])))
    for line in _read(netns, "unix"):
        fields = line.split()
        if len(fields) < 8:
            continue  # unbound
        flags, kind, inode, path = int(fields[3], 16), int(fields[4], 16), int(fields[6]), fields[7]
        if flags & _ACCEPTCON or kind == _UNIX_DGRAM:
            found.append(Listener("unix", path, None, inode))
    return found


def socket_owners(inodes: set[int]) -> dict[int, int]:
    """``inode -> PID`` of the first process holding each socket (needs root: every ``/proc/*/fd``)."""
    owners: dict[int, int] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    owners.setdefault(inode, pid)
    return owners


_ROW = re.compile(r"^\|\s*`([^`]+)`([^|]*)\|([^|]*)\|\s*\*\*([a-z -]+)\*\*[^|]*\|(.*)\|\s*$")


def census_rows(path: Path) -> dict[str, CensusRow]:
    """The table of ``docs/security/socket-census.md``: key -> row.

    Raises:
        AssertionError: a row's key appears twice, or the table has no rows.
    """
    rows: dict[str, CensusRow] = {}
    for line in path.read_text().splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        key, label, container, verdict, text = (group.strip() for group in match.groups())
        assert key not in rows, f"census row {key!r} appears twice"
        rows[key] = CensusRow(key, label, container.split(",")[0].strip("` "), verdict, text)
    assert rows, f"no census rows in {path}"
    return rows
