"""What a snapshot build read, and whether reading it again would give the same bytes.

Every file a build reads goes through an :class:`InputRecorder`, which notes a fingerprint of exactly
the bytes handed to the parser (``sha256:<hex>``, or ``error:<errno>`` for a file that could not be
read). :func:`inputs_unchanged` compares those with the files now: reading, never parsing. The files
come from a :class:`FileSource`: the disk, or :class:`MemoryFiles` in unit tests.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from sidecar.config.loader import MAX_CONFIG_BYTES, read_limited

__all__ = [
    "DISK",
    "DiskFiles",
    "FileSource",
    "InputRecorder",
    "Inputs",
    "MemoryFiles",
    "fingerprint",
    "inputs_unchanged",
]

Inputs = Mapping[Path, str]
"""What a build read: file -> fingerprint (``sha256:<hex>`` of its bytes, or ``error:<errno>``)."""

_FINGERPRINT_LIMIT = MAX_CONFIG_BYTES


class FileSource(Protocol):
    """Where the files a configuration names are read from."""

    def fetch(self, path: Path, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of ``path``; raises ``OSError`` (``FileNotFoundError`` when missing)."""
        ...

    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists (``Path.exists`` semantics)."""
        ...


class DiskFiles:
    """The real filesystem."""

    def fetch(self, path: Path, limit: int) -> bytes:
        """See :meth:`FileSource.fetch`."""
        return read_limited(path, limit)

    def exists(self, path: Path) -> bool:
        """See :meth:`FileSource.exists`."""
        return path.exists()


DISK = DiskFiles()


class MemoryFiles:
    """Files held in memory, for building snapshots in unit tests (relative paths resolve against
    the configuration's directory before they get here)."""

    def __init__(self, files: Mapping[Path | str, bytes | str]) -> None:
        self.files = {Path(p): v.encode() if isinstance(v, str) else v for p, v in files.items()}

    def fetch(self, path: Path, limit: int) -> bytes:
        """See :meth:`FileSource.fetch`."""
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return self.files[path][: limit + 1]

    def exists(self, path: Path) -> bool:
        """See :meth:`FileSource.exists`."""
        return path in self.files


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fingerprint(files: FileSource, path: Path) -> str:
    """``sha256:<hex>`` of the bytes of ``path`` (up to 64 MiB), or ``error:<errno>`` when unreadable."""
    try:
        return _digest(files.fetch(path, _FINGERPRINT_LIMIT))
    except OSError as exc:
        return f"error:{exc.errno}"


def inputs_unchanged(files: FileSource, inputs: Inputs, known: Inputs | None = None) -> bool:
    """Whether every file in ``inputs`` still has the fingerprint the build saw (reads them, parses
    nothing); ``known`` holds fingerprints of files just read (not read again)."""
    known = known or {}
    return all((known[path] if path in known else fingerprint(files, path)) == seen for path, seen in inputs.items())


class InputRecorder:
    """Reads through a :class:`FileSource` and notes the fingerprint of exactly what it read.

    The fingerprint of a read is that of the bytes handed to the parser (a file that changes while a
    build runs is seen as changed afterwards); a file only checked or watched is fingerprinted when
    first named.
    """

    def __init__(self, files: FileSource = DISK) -> None:
        self.files = files
        self._seen: dict[Path, str] = {}

    def fetch(self, path: Path, limit: int) -> bytes:
        """Read like :meth:`FileSource.fetch`, noting the fingerprint (also of a failure)."""
        try:
            data = self.files.fetch(path, limit)
        except OSError as exc:
            self._seen[path] = f"error:{exc.errno}"
            raise
        self._seen[path] = _digest(data) if len(data) <= limit else fingerprint(self.files, path)
        return data

    def note(self, path: Path, seen: str | None = None) -> None:
        """Note ``path`` as an input (fingerprint ``seen``, or its current one) unless already read."""
        if path not in self._seen:
            self._seen[path] = seen if seen is not None else fingerprint(self.files, path)

    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists; noted as an input (appearing or vanishing later is a change)."""
        self.note(path)
        return self.files.exists(path)

    def inputs(self) -> Inputs:
        """Everything noted so far (a read-only copy)."""
        return MappingProxyType(dict(self._seen))
