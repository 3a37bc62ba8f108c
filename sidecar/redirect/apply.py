"""Install or remove the redirection rules with ``iptables-save``/``iptables-restore``.

Each address family is one ``*-restore`` call holding whole tables (see
:func:`~sidecar.redirect.rules.merge_table`), so a family is either fully updated or untouched.
IPv4 goes first; if IPv6 then fails, IPv4 is restored to what it was, so a failed run leaves no
partial rule set behind. All input is validated before any command runs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.redirect.rules import RedirectError, RuleSet, TableRules, merge_table

__all__ = ["Family", "apply_rules", "cleanup_rules"]

_TABLES = ("nat", "filter")
_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Family:
    """The save/restore commands of one address family."""

    name: str
    save: str
    restore: str


IPV4 = Family("IPv4", "iptables-save", "iptables-restore")
IPV6 = Family("IPv6", "ip6tables-save", "ip6tables-restore")


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise RedirectError(f"{argv[0]} not found (install iptables)")
    try:
        result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedirectError(f"{argv[0]} failed: {exc}") from None
    if result.returncode != 0:
        raise RedirectError(f"{argv[0]} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def _save(family: Family) -> dict[str, str]:
    return {table: _run([family.save, "-t", table]) for table in _TABLES}


def _restore_text(saved: dict[str, str], ours: Sequence[TableRules]) -> str:
    by_table = {rules.table: rules for rules in ours}
    return "".join(merge_table(saved[table], table, by_table.get(table)) for table in _TABLES)


def _install(pairs: Sequence[tuple[Family, Sequence[TableRules]]]) -> None:
    saved = [(family, _save(family)) for family, _ in pairs]
    done: list[tuple[Family, dict[str, str]]] = []
    try:
        for (family, ours), (_, before) in zip(pairs, saved, strict=True):
            _run([family.restore], _restore_text(before, ours))
            done.append((family, before))
    except RedirectError:
        for family, before in reversed(done):
            original = "".join(
                before[table] if f"*{table}" in before[table] else f"*{table}\nCOMMIT\n" for table in _TABLES
            )
            try:
                _run([family.restore], original)
            except RedirectError as exc:  # pragma: no cover - the kernel refused its own saved state
                raise RedirectError(f"{family.name} rules could not be rolled back: {exc}") from None
        raise


def apply_rules(rules: RuleSet) -> None:
    """Install ``rules`` for IPv4 and IPv6 (idempotent: replaces any earlier copy).

    Raises:
        RedirectError: a command is missing or failed; earlier families were rolled back.
    """
    _install([(IPV4, rules.ipv4), (IPV6, rules.ipv6)])


def cleanup_rules() -> None:
    """Remove every ``AGENT_AUTHZ_*`` chain and jump, IPv4 and IPv6; other rules are kept.

    Raises:
        RedirectError: a command is missing or failed.
    """
    _install([(IPV4, ()), (IPV6, ())])
