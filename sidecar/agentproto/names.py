"""Name patterns for tools, prompts, resources and JSON-RPC methods: exact names and ``*`` globs.

The only wildcard is ``*``: it matches any run of characters, empty included, ``/`` included
(``list_*`` matches ``list_tables``; ``db.*`` matches ``db.read`` and ``db.admin/drop``;
``table://prices_*`` matches ``table://prices_q3``; ``*`` matches everything). There is no ``?``,
no character class and no escape, so a literal ``*`` cannot be named. Matching is linear in the
length of the name (the pattern's fixed parts are found left to right, each as early as
possible), so no pattern can make a match slow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Glob", "NameSet"]


@dataclass(frozen=True, slots=True)
class Glob:
    """One pattern. ``parts`` are the fixed strings between the ``*`` s (one part: no ``*``)."""

    pattern: str
    parts: tuple[str, ...]

    @classmethod
    def compile(cls, pattern: str) -> Glob:
        """Split ``pattern`` at its ``*`` s."""
        return cls(pattern, tuple(pattern.split("*")))

    @property
    def exact(self) -> bool:
        """Whether the pattern has no ``*``."""
        return len(self.parts) == 1

    def matches(self, name: str) -> bool:
        """Whether ``name`` is matched; a leftmost-first scan, O(len(name) x len(pattern))."""
        parts = self.parts
        if len(parts) == 1:
            return name == parts[0]
        first, last = parts[0], parts[-1]
        if len(name) < len(first) + len(last) or not name.startswith(first) or not name.endswith(last):
            return False
        position, end = len(first), len(name) - len(last)
        for part in parts[1:-1]:
            found = name.find(part, position, end)
            if found < 0:
                return False
            position = found + len(part)
        return True

    def covers(self, other: Glob) -> bool:
        """Whether every name ``other`` matches is matched by this pattern (used by attenuation).

        Decided by matching ``other``'s pattern text, its ``*`` s read as literal characters that only
        a ``*`` of this pattern can absorb. Sound: each ``*`` of ``other`` lies inside a ``*`` of this
        pattern, which can absorb whatever it stands for. Not complete: a few true inclusions are
        refused (then name the sub-pattern more plainly).
        """
        if self.exact:
            return other.exact and other.pattern == self.pattern
        return self.matches(other.pattern)


@dataclass(frozen=True, slots=True)
class NameSet:
    """A set of exact names and globs. ``matches`` costs one set lookup plus one scan per glob."""

    exact: frozenset[str]
    globs: tuple[Glob, ...]

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> NameSet:
        """Build from patterns (duplicates collapse)."""
        compiled = [Glob.compile(p) for p in dict.fromkeys(patterns)]
        return cls(frozenset(g.pattern for g in compiled if g.exact), tuple(g for g in compiled if not g.exact))

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every pattern, exact names first (sorted), then the globs in order."""
        return (*sorted(self.exact), *(g.pattern for g in self.globs))

    def matches(self, name: str) -> bool:
        """Whether ``name`` is in the set."""
        return name in self.exact or any(g.matches(name) for g in self.globs)

    def covers(self, other: NameSet) -> bool:
        """Whether every name of ``other`` is in this set (sound, see :meth:`Glob.covers`)."""
        mine = [Glob.compile(p) for p in self.exact] + list(self.globs)
        theirs = [Glob.compile(p) for p in other.exact] + list(other.globs)
        return all(any(g.covers(t) for g in mine) for t in theirs)
